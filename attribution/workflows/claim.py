"""`attribution claim`: value texts that arrive after training, by exact and verified replay of the run.

Why replay: In-Run Shapley values a document against a text at the weights of each step the run
actually took. A text that arrives after training (a rights holder's work, a passage the model
wrote) can be valued the same way only by taking those steps again. The run kept the step-0
weights and a chain of checkpoints every `keep_every` steps (`attribution.train.chain`); replay
loads one, takes the same batches and optimizer steps with the claim texts as per-example
validation sets, and must land on the next kept checkpoint bit for bit (CPU float32). So the
values are the run's own, not those of some other trajectory.

The replay contract:
- the corpus must have the run's fingerprint, and every kept checkpoint must hash to the value the
  run recorded; either check fails before any work starts (or, for a link, before it is used);
- segments between consecutive links are independent: `workers` processes replay them in
  parallel, and values add up over steps, so the merged result equals the sequential one;
- each finished segment is written atomically under `OUT/.segments/`; `resume=True` keeps them and
  replays the rest, so a kill -9 loses at most the segment in flight and counts nothing twice;
- targeted mode (`docs=`) replays only the segments in which those documents were trained and
  stores values for them only: a cost of segment length x appearances instead of the whole run;
- the claim texts are valued next to the run's fixed reference set (when it has one), never next
  to each other, so a claim's attribution does not depend on which other claims were asked about;
- the output is a run directory (same files and columns) whose manifest names the parent run and
  the replayed steps, so `attribution report`, `compare` and the notebook read it unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attribution.errors import UserError
from attribution.io import atomic_path, atomic_write
from attribution.train import chain
from attribution.train import distributed as dist_util
from attribution.train.config import RunConfig
from attribution.train.reference import NAME as REFERENCE_SET
from attribution.values.manifest import FILENAME as MANIFEST_FILE
from attribution.values.manifest import Manifest
from attribution.values.rundir import DOCS, RunDir
from attribution.values.views import default_for

CLAIM_SET = "claims"
SEGMENTS_DIR = ".segments"


@dataclass(frozen=True)
class Segment:
    """Steps `start + 1 .. end`, replayed from the link at `start` and verified against the link at `end`."""

    start: int
    end: int

    @property
    def name(self) -> str:
        return f"seg_{self.start:07d}_{self.end:07d}"


@dataclass
class ClaimJob:
    """Everything one segment's replay needs, as plain data (it crosses process boundaries)."""

    run: str
    out: str
    config: dict[str, Any]
    val: dict[str, str]
    parent_val: dict[str, str]
    total: int
    targets: list[str] | None
    threads: int | None
    tolerance: float


# ---------------------------------------------------------------------------------------------
# Setup and checks (before any work)


def read_parent(run: Path) -> tuple[Manifest, RunConfig, list[chain.Link]]:
    """The finished run's manifest, configuration and replay chain (UserError when it cannot be replayed)."""
    rd = RunDir(run)
    rd.require((MANIFEST_FILE, DOCS))
    manifest = rd.manifest()
    if manifest.status != "complete":
        raise UserError(
            f"{run}: the run is not finished (status {manifest.status!r}); finish it with --resume first"
        )
    links = chain.links(run)
    if len(links) < 2 or links[0].step != 0 or links[-1].step != manifest.total_steps:
        raise UserError(
            f"{run}: this run kept no replay chain, so claims cannot be replayed; rerun it with "
            "`attribution run ... --keep-every K` (K > 0, e.g. the preset's default)"
        )
    return manifest, RunConfig.of_run(manifest.config), links


def _check_corpus(cfg: RunConfig, manifest: Manifest) -> None:
    """Refuse a corpus whose content fingerprint is not the run's, before tokenizing anything."""
    from attribution.corpus import corpus_fingerprint, resolve_corpus

    paths: list[Path] = []
    for spec in cfg.corpus:
        paths.extend(resolve_corpus(spec))
    found = corpus_fingerprint(paths)
    if found != manifest.corpus.fingerprint:
        names = ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
        raise UserError(
            f"{names}: corpus fingerprint {found[:16]} differs from the run's "
            f"{str(manifest.corpus.fingerprint)[:16]}: the corpus changed since training, replay refused"
        )


def _read_claims(texts: Path) -> int:
    from attribution.corpus import read_validation

    if not texts.is_file():
        raise UserError(f'{texts}: no such file (--texts expects JSONL, one {{"id", "text"}} object a line)')
    docs = read_validation(texts)
    if not docs:
        raise UserError(f"{texts}: no claim texts")
    return len(docs)


def segments_for(
    links: Sequence[chain.Link], train_steps: dict[int, set[str]] | None, targets: Sequence[str] | None
) -> list[Segment]:
    """Consecutive link pairs; with `targets`, only those whose steps train one of the target documents."""
    segs = [Segment(a.step, b.step) for a, b in zip(links, links[1:], strict=False)]
    if targets is None or train_steps is None:
        return segs
    wanted = set(targets)
    return [s for s in segs if any(train_steps[t] & wanted for t in range(s.start + 1, s.end + 1))]


# ---------------------------------------------------------------------------------------------
# One segment


def _load(job: ClaimJob):
    """The run's data, with the claim texts (and reference) as the validation sets to value against."""
    from attribution.train import loop
    from attribution.train.distributed import DistInfo

    cfg = RunConfig(**job.config)
    parent_cfg = dataclasses.replace(cfg, val=dict(job.parent_val))
    cache = Path(cfg.cache_dir) if cfg.cache_dir else loop.default_cache_dir()
    # the parent's own validation sets decide which documents were kept out (identical texts)
    data = loop.load_training(parent_cfg, loop.load_validation(parent_cfg), cache, DistInfo())
    val = loop.load_validation(dataclasses.replace(cfg, val=dict(job.val)))
    for v in val.values():
        v.per_example = True  # a claim is always valued per text
    ref = loop.reference_set(data)  # a claim is valued next to the run's fixed reference, never other claims
    if ref is not None:
        val[ref.name] = ref
    return cfg, data, val


def replay_segment(job: ClaimJob, seg: Segment) -> Path:
    """Replay one segment, verify it against the next link, and write its per-step values atomically."""
    import torch

    from attribution.train import loop
    from attribution.train.distributed import DistInfo

    if job.threads:  # the run's intra-op thread count: float32 sums, hence the trajectory, depend on it
        torch.set_num_threads(job.threads)
    cfg, data, val = _load(job)
    device, dtype = loop.resolve_device(cfg)
    torch.use_deterministic_algorithms(device == "cpu", warn_only=True)
    model = loop.build_model(cfg, device, dtype)
    optimizer = loop.build_optimizer(model, cfg)
    links = {lk.step: lk for lk in chain.links(job.run)}
    state = chain.load_link(links[seg.start], model, optimizer, device=device)
    torch.set_rng_state(state["rng"]["torch"])
    position = int(state["position"])
    stepper = loop.make_step(model, val, cfg, DistInfo())
    sampler = loop.Sampler(data.train_seqs, cfg.seed)
    arrays: dict[str, np.ndarray] = {}
    losses = []
    for step in range(seg.start + 1, seg.end + 1):
        batch_idx = sampler.take(position, cfg.batch_size)
        ids = torch.from_numpy(np.asarray(data.seqset.ids[batch_idx], dtype=np.int64)).to(device)
        mask = torch.from_numpy(np.asarray(data.seqset.mask[batch_idx], dtype=np.int64)).to(device)
        loss, values = stepper.run(ids, mask, loop.lr_at(step, cfg, job.total), optimizer)
        position += cfg.batch_size
        losses.append(loss)
        arrays[f"{step}/batch"] = batch_idx  # whole batches: the per-step normalizers need every row
        for name in val:
            arrays[f"{step}/set/{name}"] = values.per_set[name]
            arrays[f"{step}/example/{name}"] = values.per_example[name]
            if name in values.per_example_cos:
                arrays[f"{step}/cos/{name}"] = values.per_example_cos[name]
    stepper.finish()
    worst = chain.deviation(model, links[seg.end])
    if worst > job.tolerance:
        raise UserError(
            f"{links[seg.end].path}: replay diverged from the run at step {seg.end} "
            f"(largest weight difference {worst:.3g} > tolerance {job.tolerance:g}); the checkpoints, "
            f"corpus, software or thread count ({torch.get_num_threads()} here) differ from the run's"
        )
    return _write_segment(
        Path(job.out), seg, arrays, {"deviation": worst, "losses": losses, "device": device, "dtype": dtype}
    )


def _write_segment(out: Path, seg: Segment, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    from safetensors.numpy import save_file

    folder = out / SEGMENTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"{seg.name}.safetensors") as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    with atomic_write(folder / f"{seg.name}.json") as fh:  # written last: its presence marks the segment done
        json.dump(meta, fh)
    return folder / f"{seg.name}.json"


def _segment_done(out: Path, seg: Segment) -> bool:
    folder = out / SEGMENTS_DIR
    return (folder / f"{seg.name}.json").is_file() and (folder / f"{seg.name}.safetensors").is_file()


def _replay_star(args: tuple[ClaimJob, Segment]) -> Path:
    return replay_segment(*args)


# ---------------------------------------------------------------------------------------------
# The command


def _train_steps(cfg: RunConfig, data, total: int) -> dict[int, set[str]]:
    """Which documents each step trains (the batches follow from the seed; no model is needed)."""
    from attribution.train import loop

    sampler = loop.Sampler(data.train_seqs, cfg.seed)
    doc_ids = data.seqset.docs["doc_id"].astype(str).to_numpy()
    seq_doc = np.asarray(data.seqset.seq_doc)
    return {
        step: set(doc_ids[seq_doc[sampler.take((step - 1) * cfg.batch_size, cfg.batch_size)]])
        for step in range(1, total + 1)
    }


def claim(
    run: str | Path,
    texts: str | Path,
    out: str | Path,
    *,
    docs: Sequence[str] | None = None,
    workers: int = 1,
    resume: bool = False,
    tolerance: float | None = None,
    report: bool = True,
    progress: bool = True,
    in_run_cosine: bool | None = None,
) -> Path:
    """Value the texts in `texts` (JSONL) against the finished run `run` by replay; returns the output run dir.

    `in_run_cosine`: compute the in-run cosine views' norms in the replay (None: as the run did).
    Under torchrun, each rank replays every world-th segment and rank 0 merges them."""
    run, texts, out = Path(run), Path(texts), Path(out)
    started = time.time()
    manifest, parent_cfg, links = read_parent(run)
    n_claims = _read_claims(texts)
    _check_corpus(parent_cfg, manifest)
    info = dist_util.init_from_env("cpu")
    fresh = not resume and not out.exists()
    try:
        if info.is_main:
            _prepare_out(run, out, resume)
        dist_util.barrier(info)
        if in_run_cosine is not None:
            parent_cfg = dataclasses.replace(parent_cfg, in_run_cosine=in_run_cosine)
        job, cfg, data, val_data = _job(run, texts, out, manifest, parent_cfg, n_claims, docs, tolerance)
        total = job.total
        segs = segments_for(links, _train_steps(cfg, data, total) if docs else None, job.targets)
        todo = [s for s in segs if not (resume and _segment_done(out, s))]
        n_steps = sum(s.end - s.start for s in segs)
        if info.is_main:
            print(
                f"claim: {n_claims} text(s); replaying {len(segs)} of {len(links) - 1} segment(s), {n_steps} of "
                f"{total} steps ({len(segs) - len(todo)} already done), {workers * info.world} worker(s)",
                file=sys.stderr,
            )
        _run_segments(job, todo[info.rank :: info.world], workers, progress and info.is_main)
        dist_util.barrier(info)
        if not info.is_main:
            return out
        run_dir = _merge(
            out,
            cfg,
            data,
            val_data,
            segs,
            job,
            manifest,
            started=started,
            n_steps=n_steps,
            workers=workers * info.world,
        )
    except UserError:
        if fresh and info.is_main:  # a refused replay (diverged, tampered, bad --docs) leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        dist_util.shutdown(info)
    if report:
        from attribution.report.claims import write_claims_report

        write_claims_report(run_dir, run_dir, val_set=CLAIM_SET)
    return run_dir


def _prepare_out(run: Path, out: Path, resume: bool) -> None:
    if out.resolve() == run.resolve():
        raise UserError(f"{out}: --out must not be the run directory itself")
    if out.exists() and any(out.iterdir()) and not resume:
        raise UserError(
            f"{out} already exists; pass --resume to continue a claim replay or choose another --out"
        )
    if not resume and (out / SEGMENTS_DIR).exists():
        shutil.rmtree(out / SEGMENTS_DIR)
    out.mkdir(parents=True, exist_ok=True)


def _job(
    run: Path,
    texts: Path,
    out: Path,
    manifest: Manifest,
    parent_cfg: RunConfig,
    n_claims: int,
    docs: Sequence[str] | None,
    tolerance: float | None,
):
    """The replay job, and the data it reads (the parent's training data, the claims as validation sets)."""
    # the reference is rebuilt from the corpus (same seed, same documents), not read back as a validation set
    parent_val = {name: str(p) for name, p in RunDir(run).val_set_paths().items() if name != REFERENCE_SET}
    val = {CLAIM_SET: str(texts)}
    cfg = dataclasses.replace(
        parent_cfg,
        out=str(out),
        resume=False,
        progress=False,
        per_example_max=max(parent_cfg.per_example_max, n_claims),
    )
    job = ClaimJob(
        run=str(run),
        out=str(out),
        config=cfg.to_json() | {"betas": cfg.betas, "exclude_ids": cfg.exclude_ids},
        val=val,
        parent_val=parent_val,
        total=int(manifest.total_steps),
        targets=[str(d) for d in docs] if docs else None,
        threads=manifest.training.threads,
        tolerance=_tolerance(tolerance, manifest),
    )
    _, data, val_data = _load(job)
    if docs:
        known = set(data.docs["doc_id"].astype(str))
        unknown = [d for d in docs if str(d) not in known]
        if unknown:
            raise UserError(f"--docs: not trained documents of {run}: {', '.join(map(str, unknown[:5]))}")
    return job, cfg, data, val_data


def _tolerance(tolerance: float | None, manifest: Manifest) -> float:
    """Bitwise (0) on CPU float32/float64; a bf16 or GPU run reports its deviation and allows a small one."""
    if tolerance is not None:
        return float(tolerance)
    exact = manifest.training.device in (None, "cpu") and manifest.training.dtype in (
        None,
        "float32",
        "float64",
    )
    return 0.0 if exact else 1e-3


def _run_segments(job: ClaimJob, todo: list[Segment], workers: int, progress: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="replay", unit="segment", disable=not progress, file=sys.stderr)
    try:
        if workers <= 1 or len(todo) <= 1:
            import torch

            before = torch.get_num_threads()
            try:
                for seg in todo:
                    replay_segment(job, seg)
                    bar.update(1)
            finally:
                torch.set_num_threads(before)  # replay_segment set the run's count; the caller keeps its own
            return
        import os

        # every worker keeps the run's thread count (float32 sums depend on it), even when that oversubscribes
        threads = job.threads or 1
        if threads * min(workers, len(todo)) > (os.cpu_count() or 1):
            print(
                f"claim: {workers} workers x {threads} threads (the run's) share {os.cpu_count()} cores; "
                "values stay bitwise, the speedup is smaller",
                file=sys.stderr,
            )
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(workers, len(todo))) as pool:
            for _ in pool.imap_unordered(_replay_star, [(job, s) for s in todo]):
                bar.update(1)
    finally:
        bar.close()


def _merge(
    out: Path,
    cfg: RunConfig,
    data,
    val,
    segs: list[Segment],
    job: ClaimJob,
    parent: Manifest,
    *,
    started: float,
    n_steps: int,
    workers: int,
) -> Path:
    """Add the segments' per-step values into a value store, in step order, and write the run directory."""
    from safetensors.numpy import load_file

    from attribution.train import loop
    from attribution.train.store import ValueStore

    docs = data.docs
    seq_row = data.store_row_of_seq
    if job.targets is not None:
        keep = docs["doc_id"].astype(str).isin(set(job.targets)).to_numpy()
        new_row = np.full(len(docs), -1, dtype=np.int64)
        new_row[keep] = np.arange(int(keep.sum()))
        seq_row = np.where(seq_row >= 0, new_row[np.maximum(seq_row, 0)], -1)
        docs = docs[keep].reset_index(drop=True)
    store = ValueStore(
        out, docs, seq_row, list(val), {n: v.example_ids for n, v in val.items()}, cfg.stage_window
    )
    log = loop.TrainLog(out / "train_log.csv", [])
    log.start(None)
    worst = 0.0
    with_cos: set[bool] = set()
    for seg in segs:
        arrays = load_file(str(out / SEGMENTS_DIR / f"{seg.name}.safetensors"))
        meta = json.loads((out / SEGMENTS_DIR / f"{seg.name}.json").read_text(encoding="utf-8"))
        worst = max(worst, float(meta["deviation"]))
        for step, loss in zip(range(seg.start + 1, seg.end + 1), meta["losses"], strict=True):
            get = {name: arrays.get(f"{step}/cos/{name}") for name in val}
            with_cos.add(any(c is not None for c in get.values()))
            if len(with_cos) > 1:  # a resumed replay that changed --in-run-cosine: partial cosine sums
                raise UserError(
                    f"{out}: some replayed segments have the in-run cosines and some do not; resume with "
                    "the --in-run-cosine choice the replay started with, or start it again"
                )
            batch = arrays[f"{step}/batch"]
            store.add(
                step,
                batch,
                {n: arrays[f"{step}/set/{n}"] for n in val},
                {n: arrays[f"{step}/example/{n}"] for n in val},
                {n: c for n, c in get.items() if c is not None},
                keep=None if job.targets is None else seq_row[batch] >= 0,
            )
            log.write(step, loop.lr_at(step, cfg, job.total), loss, None, None)
    store.flush(1, job.total)
    store.finalize()
    parent_docs = RunDir(job.run).table(DOCS, required=True)
    if job.targets is not None:
        parent_docs = parent_docs[parent_docs["doc_id"].isin(set(job.targets))]
    with atomic_path(out / DOCS) as tmp:
        parent_docs.to_parquet(tmp, index=False)
    loop._write_val_copies(out, val)
    store.default_view = default_for(_checkpoint_cosines(job, cfg, val, out))
    finished = time.time()
    manifest = _claim_manifest(parent, cfg, val, store, segs, job, started, finished, n_steps, worst, workers)
    manifest.write(out)
    shutil.rmtree(out / SEGMENTS_DIR, ignore_errors=True)
    return out


def _checkpoint_cosines(job: ClaimJob, cfg: RunConfig, val, out: Path) -> bool:
    """The claims' exact gradient similarity at the parent's kept checkpoints (`checkpoint_values.parquet`,
    the default view's input), against the replayed documents; the reference rows come from the parent
    run as in training. Whether the claim run has it."""
    from attribution.workflows import checkpoint_similarity

    if not cfg.checkpoint_view:
        return False
    frame = checkpoint_similarity.for_run(job.run, {CLAIM_SET: val[CLAIM_SET]}, doc_ids=job.targets)
    checkpoint_similarity.write(out, frame)
    return True


def _claim_manifest(
    parent: Manifest,
    cfg: RunConfig,
    val,
    store,
    segs: list[Segment],
    job: ClaimJob,
    started: float,
    finished: float,
    n_steps: int,
    worst: float,
    workers: int,
) -> Manifest:
    """The parent's manifest, with this replay's validation sets, values and provenance."""
    raw = parent.to_dict()
    raw["status"] = "complete"
    raw["config"] = cfg.to_json()
    raw["val_sets"] = {
        n: {"path": v.path, "n_docs": len(v.docs), "n_sequences": len(v.ids), "per_example": True}
        for n, v in val.items()
    }
    raw["values"] = store.describe()
    raw["final_val_loss"] = None
    raw["timings"] = {"started": started, "finished": finished, "train_seconds": finished - started}
    raw["claim"] = {
        "parent_run": str(Path(job.run).resolve()),
        "parent_fingerprint": parent.corpus.fingerprint,
        "texts": str(Path(job.val[CLAIM_SET]).resolve()),
        "segments": [[s.start, s.end] for s in segs],
        "replayed_steps": n_steps,
        "total_steps": job.total,
        "targeted_docs": job.targets,
        "max_weight_deviation": worst,
        "tolerance": job.tolerance,
        "workers": workers,
        "verified": "bitwise" if worst == 0.0 else f"within {job.tolerance:g}",
    }
    return Manifest.from_dict(raw)
