"""`attribution claim --fast`: a claim's top documents from the run's sketch index, then confirmed exactly.

Why: exact replay (`attribution.workflows.claim`) costs a valued re-run. The run wrote each document's
weighted gradient sketch (`attribution.train.sketch`); a claim's sketched gradient at every kept
checkpoint, with the same projections, scores every document with one inner product. The top `k`
candidates per claim are then replayed exactly (targeted mode, `claim(..., docs=...)`), and both
numbers are reported: the estimate, and the exact value with its rank among the candidates.

The claim's gradient for segment (a, b] is the trapezoid `(g(w_a) + g(w_b)) / 2` of the kept
checkpoints around it (the run's values use the weights of every step between). A run that kept no
chain is answered with the gradient at its final weights for every segment, as an estimate only.

Ranking follows a view (default: the run's default view), so the fast candidates are the top of the
ranking the exact values are read by. The default view (`standout_checkpoint`) and `checkpoint_cosine`
read the checkpoint similarity, not in-run values: they are ranked from the run's checkpoint index
(`attribution.workflows.checkpoint_sketch`) and confirmed by the candidates' exact checkpoint cosines,
with no replay of training (an older run without that index is ranked by the in-run default view, and
the answer says so). The in-run views are linear in the sketch: `per_token` divides the
document vectors by the tokens the document contributed, `contrast` subtracts the mean reference-set
query vector from the claim's, `cosine` uses the unit-normalized index and query (TrackStar style;
an analogue of, not the same number as, the run's per-step cosine view).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from attribution.engine.rules import trainable_params
from attribution.errors import UserError
from attribution.io import atomic_write
from attribution.train import chain
from attribution.train.config import RunConfig
from attribution.train.sketch import (
    BALANCED,
    Projection,
    SketchIndex,
    balanced_claim_side,
    make_index,
    model_params,
    read_sketch,
)
from attribution.values.manifest import Manifest
from attribution.values.rundir import RunDir
from attribution.values.views import IN_RUN_VIEW, VIEWS

FAST_VIEWS = (
    "standout_checkpoint",
    "checkpoint_cosine",
    "value",
    "per_token",
    "cosine",
    "contrast",
    "contrast_per_token",
    "contrast_cosine",
    "standout",
    "standout_cosine",
)
REFERENCED = ("contrast", "standout")  # views that need the reference set's claim-side vectors
CHUNK = 16  # claim sequences per gradient pass
CANDIDATES = "candidates.txt"
NEIGHBOURS = "reference_neighbours.json"  # per claim, the reference texts its standout z was measured against
REPLAY_CONFIRMED = "by targeted exact replay"
CHECKPOINT_CONFIRMED = (
    "by their exact checkpoint similarity (every parameter, no projection, at the run's hash-verified kept "
    "checkpoints)"
)


@dataclass
class FastClaims:
    """What `fast_claim` found: one row per (claim, candidate), and how far it got."""

    out: Path
    table: pd.DataFrame
    view: str
    confirmed: bool
    notes: list[str]
    how: str = ""  # how the candidates were confirmed (empty: estimates only)


def _config(manifest: Manifest) -> RunConfig:
    return dataclasses.replace(RunConfig.of_run(manifest.config), progress=False, resume=False)


def _view(view: str | None, manifest: Manifest, cfg: RunConfig, notes: list[str], run: Path) -> str:
    from attribution.workflows import checkpoint_sketch

    name = view or manifest.default_view
    if name in checkpoint_sketch.VIEWS and (view is not None or checkpoint_sketch.exists(run)):
        return name
    if view is not None and name not in FAST_VIEWS:
        raise UserError(f"--view {name}: the sketch can rank by {', '.join(FAST_VIEWS)}")
    if name not in FAST_VIEWS or name in checkpoint_sketch.VIEWS:
        # an older run, or one made with --no-sketch: the in-run sketch answers by the in-run default view
        name, was = (IN_RUN_VIEW if IN_RUN_VIEW in FAST_VIEWS else "value"), name
        notes.append(
            f"the run has no checkpoint sketch index for its default view {was!r}; ranked by {name!r}"
        )
    if name.startswith(REFERENCED) and not (cfg.reference or cfg.reference_texts):
        base = name.split("_", 1)[1] if "_" in name else "value"
        notes.append(f"the run has no fixed reference set, so {name!r} is ranked as {base!r}")
        name = base
    return name


# ---------------------------------------------------------------------------------------------
# Claim gradients at the kept checkpoints


class _Gradients:
    """`(R0 (x) R1) g` of texts at the weights loaded into `model` (sum of each text's sequences)."""

    def __init__(self, model, projection: Projection):
        from attribution.engine.capture import Capturer

        self.model = model
        self.projection = projection
        self.capturer = Capturer(model)
        self.names = model_params(model)[1]

    def kron(self, ids: np.ndarray, mask: np.ndarray, owner: np.ndarray, n_texts: int):
        import torch

        from attribution.engine.task import LanguageModelingTask
        from attribution.engine.valuer import eval_mode

        task = LanguageModelingTask()
        dev = next(self.model.parameters()).device
        out = None
        for s in range(0, len(ids), CHUNK):
            i = torch.from_numpy(ids[s : s + CHUNK]).to(dev)
            m = torch.from_numpy(mask[s : s + CHUNK]).to(dev)
            with eval_mode(self.model), torch.enable_grad():
                cap = self.capturer.grads_only(lambda i=i, m=m: task.per_sequence_loss(self.model, i, m))
            rows = self.projection.first_stage(cap, self.names).double().cpu()
            out = torch.zeros(n_texts, rows.shape[1], dtype=torch.float64) if out is None else out
            out.index_add_(0, torch.from_numpy(owner[s : s + CHUNK]), rows)
        return out

    def kron_preconditioned(
        self, ids: np.ndarray, mask: np.ndarray, owner: np.ndarray, n_texts: int, k: dict
    ):
        """`(R0 (x) R1) (K * g)` per text: Adam's elementwise `K` needs each text's dense gradient, so texts
        are backpropagated one at a time (param-sized memory, not texts x params)."""
        import torch

        from attribution.engine.rules import canonical_shape, trainable_params
        from attribution.engine.task import LanguageModelingTask
        from attribution.engine.valuer import eval_mode

        task = LanguageModelingTask()
        params = trainable_params(self.model)
        dev = next(self.model.parameters()).device
        out = torch.zeros(n_texts, self.projection.width, dtype=torch.float64)
        for j in range(n_texts):
            rows = np.flatnonzero(owner == j)
            self.model.zero_grad(set_to_none=True)
            with eval_mode(self.model), torch.enable_grad():
                for s in range(0, len(rows), CHUNK):
                    r = rows[s : s + CHUNK]
                    i, m = torch.from_numpy(ids[r]).to(dev), torch.from_numpy(mask[r]).to(dev)
                    task.per_sequence_loss(self.model, i, m).sum().backward()
            grads = {
                name: (k[pid] * p.grad).reshape(canonical_shape(p))
                for pid, (name, p) in params.items()
                if p.grad is not None
            }
            grads |= {
                name: torch.zeros(canonical_shape(p), dtype=p.dtype, device=dev)
                for pid, (name, p) in params.items()
                if name not in grads
            }
            out[j] = self.projection.first_stage_dense(grads).cpu()
        self.model.zero_grad(set_to_none=True)
        return out


def link_preconditioner(model, optimizer) -> dict:
    """Adam's `K` (param id -> param-shaped) from the optimizer state loaded into `optimizer`.

    The plain form of `attribution.engine.optimizer.adam_preconditioner` with no batch gradient: the
    in-run values use each step's own `v_t`, which the kept checkpoint's `v` approximates for the steps
    around it (`beta2` = 0.999 moves it slowly)."""
    import torch

    from attribution.engine.optimizer import adam_preconditioner
    from attribution.engine.rules import trainable_params

    params = {pid: p for pid, (_, p) in trainable_params(model).items()}
    zeros = {pid: torch.zeros_like(p) for pid, p in params.items()}
    return adam_preconditioner(optimizer, params, zeros, second_moment=False)


def _has_adam_state(optimizer) -> bool:
    return any("exp_avg_sq" in s for s in optimizer.state.values())


def query_vectors(
    run: Path, cfg: RunConfig, sketch: SketchIndex, texts: dict, *, progress: bool = False
) -> tuple[dict[str, np.ndarray], list[str]]:
    """`name -> [n_texts, dim]` sketched claim-side vectors for each text set in `texts` (ValData).

    Per segment, the trapezoid of the two kept checkpoints around it; without a chain, the final weights.
    Under a shared mix (`attribution.train.sketch`) the segments' vectors are averaged, so that the score is
    in the units of a value: exact if the claim's gradient did not change over training.
    For optimizer-aware runs each checkpoint's claim gradient is preconditioned with Adam's `K` from its
    optimizer state (the step-0 checkpoint has none yet and takes the next checkpoint's)."""
    from tqdm import tqdm

    from attribution.train import checkpoint as ckpt
    from attribution.train import loop

    notes: list[str] = []
    device, dtype = loop.resolve_device(cfg)
    model = loop.build_model(cfg, device, "float64" if dtype == "float64" else "float32")
    optimizer = loop.build_optimizer(model, cfg)
    projection = sketch.projection()
    if model_params(model)[0] != projection.params:
        raise UserError(f"{sketch.folder}: the sketch's layers are not this run's model (shapes differ)")
    grads = _Gradients(model, projection)
    segs = sketch.segments
    links = {lk.step: lk for lk in chain.links(run)}
    bounds = sorted({a for a, _ in segs} | {b for _, b in segs})
    out = {name: np.zeros((len(v.docs), sketch.dim)) for name, v in texts.items()}
    from attribution.engine.optimizer import is_adam

    aware = bool(cfg.optimizer_aware) and is_adam(optimizer)
    k_next: dict | None = None  # K for a checkpoint with no optimizer state yet (step 0)
    split = sketch.meta.get("preconditioner") == BALANCED  # documents carry balance(K_t): claims take K / F
    params = {pid: p for pid, (_, p) in trainable_params(model).items()}

    def precondition(model, optimizer) -> dict:
        k = link_preconditioner(model, optimizer)
        return balanced_claim_side(k, params) if split else k

    def add(weights: list[tuple[int, float]]) -> None:
        k = None
        if aware:
            k = precondition(model, optimizer) if _has_adam_state(optimizer) else k_next
        for name, v in texts.items():
            if k is None:
                kron = grads.kron(v.ids, v.mask, v.seq_doc, len(v.docs))
            else:
                kron = grads.kron_preconditioned(v.ids, v.mask, v.seq_doc, len(v.docs), k)
            for s, w in weights:
                out[name] += w * projection.mix(kron, s).numpy()

    if all(b in links for b in bounds):
        if aware and len(bounds) > 1:  # the step-0 link has no Adam state: use the next link's K
            chain.load_link(links[bounds[1]], model, optimizer, device=device)
            k_next = precondition(model, optimizer)
            notes.append(
                "optimizer-aware run: claim gradients preconditioned with Adam's K of each kept checkpoint"
                + (" (the claim side K / F of the split, attribution.train.sketch.balance)" if split else "")
            )
        for b in tqdm(
            bounds, desc="claim gradients", unit="checkpoint", disable=not progress, file=sys.stderr
        ):
            chain.load_link(links[b], model, optimizer, device=device)
            # the link ends the segment before it and starts the one after it: half of each trapezoid
            add([(i, 0.5) for i, (a, e) in enumerate(segs) if b in (a, e)])
    elif not links:
        if ckpt.load_checkpoint(run, model, optimizer, device=device) is None:
            raise UserError(f"{run}: no checkpoint to take the claim gradient at (checkpoints/ is missing)")
        add([(i, 1.0) for i in range(len(segs))])
        notes.append(
            "the run kept no replay chain: every segment uses the claim gradient at the final weights, "
            "and the candidates cannot be confirmed by exact replay (estimates only)"
        )
    else:
        missing = [b for b in bounds if b not in links]
        raise UserError(
            f"{run}: the replay chain lacks the kept checkpoints at steps {missing[:5]} that the sketch's "
            "segments end at"
        )
    if projection.mix_kind == "shared":  # one mix: the mean over segments meets the document's whole training
        out = {name: v / len(segs) for name, v in out.items()}
    return out, notes


# ---------------------------------------------------------------------------------------------
# Search


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def _doc_index(sketch: SketchIndex, view: str, run: Path, reference: np.ndarray | None = None):
    """(FAISS index, scale) the view ranks: raw, unit-normalized, or raw divided by each document's
    tokens; for the standout views, divided by each document's spread over the reference set."""
    if view.startswith("standout"):
        return make_index(_standout_vectors(sketch, view, reference))
    if "cosine" in view:
        return sketch.load("unit"), sketch.scale("unit")
    if "per_token" not in view:
        return sketch.load("raw"), sketch.scale("raw")
    docs = RunDir(run).table("docs.parquet", ["doc_id", "n_tokens"], required=True)
    tokens = docs.set_index(docs["doc_id"].astype(str))["n_tokens"].reindex(sketch.meta["doc_ids"]).fillna(1)
    return make_index(sketch.vectors("raw") / np.maximum(tokens.to_numpy(np.float64), 1.0)[:, None])


def _standout_vectors(sketch: SketchIndex, view: str, reference: np.ndarray | None) -> np.ndarray:
    """`u_d / sd_d`: the standout z of `views.standout` is linear in the sketch once each document's
    vector is divided by the sample sd of its scores for the reference texts,
    z(d, t) = <u_d, q_t - mean_r q_r> / sd_r <u_d, q_r>; a document with no spread scores 0 (as the
    exact view gives it)."""
    from attribution.values.views import MIN_REFERENCE

    if reference is None or len(reference) < MIN_REFERENCE:
        raise UserError(f"--view {view}: needs at least {MIN_REFERENCE} reference texts in the run")
    u = sketch.vectors("unit" if "cosine" in view else "raw")
    r = _unit(reference) if "cosine" in view else reference
    sd = (u @ r.T).std(axis=1, ddof=1)
    ok = sd > 0
    return np.where(ok[:, None], u / np.where(ok, sd, 1.0)[:, None], 0.0)


def rank_queries(claims: np.ndarray, reference: np.ndarray | None, view: str) -> np.ndarray:
    """The query vectors of a view: unit-normalized for cosine views, minus the reference mean for the
    contrast and standout views."""
    q = _unit(claims) if "cosine" in view else claims
    if view.startswith(REFERENCED) and reference is not None and len(reference):
        q = q - (_unit(reference) if "cosine" in view else reference).mean(0, keepdims=True)
    return q


# ---------------------------------------------------------------------------------------------
# The command


def _texts(run: Path, cfg: RunConfig, texts: Path, contrast: bool) -> dict:
    from attribution.corpus import read_validation
    from attribution.train import loop
    from attribution.train.reference import NAME as REFERENCE

    if not texts.is_file():
        raise UserError(f'{texts}: no such file (--texts expects JSONL, one {{"id", "text"}} object a line)')
    if not read_validation(texts):
        raise UserError(f"{texts}: no claim texts")
    out = {"claims": loop.load_validation(dataclasses.replace(cfg, val={"claims": str(texts)}))["claims"]}
    if contrast:  # the run's fixed reference set, rebuilt from the corpus as the replay does
        ref = loop.reference_set(parent_data(run, cfg)[1])
        if ref is not None:
            out[REFERENCE] = ref
    return out


def parent_data(run: Path, cfg: RunConfig) -> tuple[dict, object]:
    """The finished run's validation sets (from its own copies; the reference set is rebuilt from the
    corpus, never read back) and its training data, as training had them: the sets decide which
    documents were held out as identical to a validation text."""
    from attribution.train import loop
    from attribution.train.distributed import DistInfo
    from attribution.train.reference import NAME as REFERENCE

    parent = {n: str(p) for n, p in RunDir(run).val_set_paths().items() if n != REFERENCE}
    pcfg = dataclasses.replace(cfg, val=parent)
    val = loop.load_validation(pcfg)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else loop.default_cache_dir()
    return val, loop.load_training(pcfg, val, cache, DistInfo())


def estimate(
    run: str | Path,
    texts: str | Path,
    *,
    view: str | None = None,
    k: int | None = None,
    progress: bool = False,
) -> tuple[pd.DataFrame, str, list[str], bool]:
    """Top-`k` documents per claim by the sketch (all documents when `k` is None): the checkpoint index
    for the checkpoint views, the in-run sketch for the others.

    Returns (rows `claim_id, rank, doc_id, estimate`, the view used, notes, whether a chain exists)."""
    from attribution.workflows import checkpoint_sketch

    run, texts = Path(run), Path(texts)
    manifest = RunDir(run).manifest()
    cfg = _config(manifest)
    notes: list[str] = []
    view = _view(view, manifest, cfg, notes, run)
    neighbours = None
    if view in checkpoint_sketch.VIEWS:
        index = checkpoint_sketch.read(run, manifest.config)
        if view == "standout_checkpoint" and "standout" not in index.meta["files"]:
            notes.append(
                "the run has no fixed reference set, so 'standout_checkpoint' is ranked as 'checkpoint_cosine'"
            )
            view = "checkpoint_cosine"
        sets = _texts(run, cfg, texts, contrast=False)
        found = checkpoint_sketch.search(run, index, view, sets["claims"], k)
        scores, doc_ids, neighbours = found.scores, found.doc_ids, found.neighbours
        if neighbours:
            n_near = len(next(iter(neighbours.values())))
            if n_near < found.reference_texts:
                notes.append(
                    f"each claim's standout z is measured against the {n_near} reference texts nearest it "
                    f"(views.NEAREST_REFERENCE), chosen by the sketch's estimates of its cosines ({NEIGHBOURS}); "
                    "`exact` is against the same texts, while `attribution claim` without --fast chooses them "
                    "from the exact cosines of every document, so its z can differ where the choice does"
                )
            else:
                notes.append(
                    f"each claim's standout z is measured against all {n_near} reference texts, per claim from "
                    "the sketch's estimates of its cosines: the run's checkpoint index predates the pooled "
                    "scale of the standout z, so its fixed statistics are not the view's"
                )
    else:
        sketch = read_sketch(run, manifest.config)
        sets = _texts(run, cfg, texts, view.startswith(REFERENCED))
        vectors, more = query_vectors(run, cfg, sketch, sets, progress=progress)
        notes += more
        q = rank_queries(vectors["claims"], vectors.get("reference"), view)
        index, scale = _doc_index(sketch, view, run, vectors.get("reference"))
        k = index.ntotal if k is None else min(int(k), index.ntotal)
        scores, rows = index.search(np.ascontiguousarray(q, dtype=np.float32), k)
        scores = scores.astype(np.float64) * scale
        doc_ids = np.asarray(sketch.meta["doc_ids"], dtype=object)[rows]
    claim_ids = sets["claims"].example_ids
    k = scores.shape[1]
    table = pd.DataFrame(
        {
            "claim_id": np.repeat(claim_ids, k),
            "rank": np.tile(np.arange(1, k + 1), len(claim_ids)),
            "doc_id": doc_ids.reshape(-1),
            "estimate": scores.reshape(-1),
        }
    )
    if neighbours:
        table.attrs["neighbours"] = neighbours
    return table, view, notes, bool(chain.links(run))


def fast_claim(
    run: str | Path,
    texts: str | Path,
    out: str | Path,
    *,
    k: int = 10,
    view: str | None = None,
    workers: int = 1,
    tolerance: float | None = None,
    progress: bool = True,
    confirm: bool = True,
) -> FastClaims:
    """Candidates from an index, confirmed exactly; writes `fast.csv`, `fast.md` and `candidates.txt`.

    Checkpoint views: the checkpoint index, confirmed by the candidates' exact checkpoint cosines
    (seconds). In-run views: the in-run sketch, confirmed by targeted exact replay, which re-runs every
    training step in which a candidate was trained (on a small corpus most of the run). `confirm=False`
    stops at the estimates."""
    from attribution.values.results import RunValues
    from attribution.workflows import checkpoint_sketch
    from attribution.workflows.claim import CLAIM_SET, claim

    run, texts, out = Path(run), Path(texts), Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists; choose another --out")
    table, view, notes, has_chain = estimate(run, texts, view=view, k=k, progress=progress)
    neighbours = table.attrs.get("neighbours")
    if has_chain and not confirm:
        notes.append("not confirmed (confirm=False / --no-confirm): estimates only")
    has_chain = has_chain and confirm
    how = ""
    if has_chain and view in checkpoint_sketch.VIEWS:
        how = CHECKPOINT_CONFIRMED
        cfg = _config(RunDir(run).manifest())
        exact = checkpoint_sketch.confirm(
            run,
            checkpoint_sketch.read(run),
            _texts(run, cfg, texts, contrast=False)["claims"],
            sorted(set(table["doc_id"])),
            view,
            neighbours=neighbours,
            progress=progress,
        )
        table = table.merge(exact, on=["claim_id", "doc_id"], how="left")
        table["exact_rank"] = table.groupby("claim_id")["exact"].rank(ascending=False, method="average")
        notes.append(
            "the candidates' exact in-run values (royalty units) need a targeted replay of training: "
            f"`attribution claim {run} --texts {texts} --out DIR --docs $(cat {out / CANDIDATES})`"
        )
    elif has_chain:
        how = REPLAY_CONFIRMED
        candidates = sorted(set(table["doc_id"]))
        replay = claim(
            run,
            texts,
            out / "replay",
            docs=candidates,
            workers=workers,
            tolerance=tolerance,
            report=False,
            progress=progress,
            in_run_cosine="value_cosine" in VIEWS[view].needs or None,
        )
        exact = RunValues.read(replay).view(view)
        exact = exact[exact["val_set"] == CLAIM_SET]
        exact = exact.rename(columns={"val_id": "claim_id", "value": "exact_value", "attribution": "exact"})
        table = table.merge(
            exact[["claim_id", "doc_id", "exact_value", "exact"]], on=["claim_id", "doc_id"], how="left"
        )
        table["exact_rank"] = table.groupby("claim_id")["exact"].rank(ascending=False, method="average")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / CANDIDATES) as fh:  # the union of the candidates, as `--docs` takes them
        fh.write(",".join(sorted(set(table["doc_id"].astype(str)))) + "\n")
    if neighbours:
        with atomic_write(out / NEIGHBOURS) as fh:
            json.dump(neighbours, fh, indent=1)
    with atomic_write(out / "fast.csv") as fh:
        table.to_csv(fh, index=False)
    with atomic_write(out / "fast.md") as fh:
        fh.write(_markdown(table, view, notes, run, how))
    return FastClaims(out, table, view, has_chain, notes, how)


def _markdown(table: pd.DataFrame, view: str, notes: list[str], run: Path, how: str) -> str:
    lines = [
        f"# Fast claims against {run}",
        "",
        f"Candidates from the run's gradient-sketch index, ranked by the `{view}` view "
        + (
            f"and confirmed {how} (`exact`: the exact value under that view, `exact_rank`: its rank among "
            "the candidates)."
            if how
            else "(estimates only, not confirmed)."
        ),
        "",
    ]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    extra = [c for c in ("exact", "exact_cosine", "exact_value", "exact_rank") if c in table.columns]
    cols = ["rank", "doc_id", "estimate"] + extra
    for claim_id, rows in table.groupby("claim_id", sort=False):
        lines += [f"## {claim_id}", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        for r in rows.itertuples(index=False):
            cells = [
                f"{getattr(r, c):.6g}" if isinstance(getattr(r, c), float) else str(getattr(r, c))
                for c in cols
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
