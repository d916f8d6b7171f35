"""The training loop: GPT-2 from scratch, nanoGPT style, with the engine valuing every step.

One step, in order (the order matters for what a value means):

1. learning rate for this step (linear warmup, then cosine to `min_lr`);
2. `valuer.forward_backward(ids, mask)`: the same gradient plain `loss.backward()` leaves, while the
   engine records what it needs for per-sequence values;
3. (several processes) gradients averaged over ranks;
4. gradient clipping; the clip factor `c = min(1, clip / (||g|| + 1e-6))` is exactly what torch
   multiplies the gradient by, and it is passed to the engine as `grad_scale`, so the values are
   those of the step actually taken (`eta * c * <g_val, g_z>` at first order);
5. `valuer.values(...)` (first order), `optimizer.step()`, `valuer.after_step()` (second order:
   trapezoid between the validation gradients before and after the step);
6. the values of the batch go to the value store (rank 0), per document.

Weight decay (AdamW) shrinks every weight by the same factor whatever the batch, so it is credited
to no document. With AdamW the default values use the SGD formula as a proxy (as the paper does);
`optimizer_aware=True` asks the engine for Adam-preconditioned values instead.

Determinism: the model is initialised from `seed`; batches are a seeded permutation of the training
sequences per epoch (epoch e uses `default_rng([seed, e])`), read as one endless stream, so the
sampler state is a single integer (the stream position) stored in the checkpoint with the torch RNG
states. Same seed, same batches, same init, same values.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attribution.errors import UserError
from attribution.io import atomic_path, atomic_write
from attribution.train import checkpoint as ckpt
from attribution.train import distributed as dist_util
from attribution.train.config import RunConfig
from attribution.train.store import ValueStore

# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class ValData:
    """One validation set, tokenized: every document becomes one or more sequences."""

    name: str
    path: str
    docs: list  # list[Document]
    ids: np.ndarray  # int64 [n_seq, T]
    mask: np.ndarray  # int64 [n_seq, T]
    seq_doc: np.ndarray  # int64 [n_seq] -> row in docs
    per_example: bool = False

    @property
    def example_ids(self) -> list[str]:
        return [d.doc_id for d in self.docs]


@dataclass
class TrainData:
    """The training sequences, which of them may be trained on, and the documents the store values."""

    seqset: Any  # attribution.tokens.SequenceSet
    fingerprint: str
    train_seqs: np.ndarray  # int64 indices into seqset of trainable sequences
    doc_rows: np.ndarray  # int64 rows of seqset.docs that are trainable
    store_row_of_seq: np.ndarray  # int64 [n_seq_all] -> row in the store's docs (-1 if excluded)
    dropped_identical: list[str] = field(default_factory=list)
    excluded: int = 0

    @property
    def docs(self) -> pd.DataFrame:
        return self.seqset.docs.iloc[self.doc_rows].reset_index(drop=True)


def default_cache_dir() -> Path:
    """Token cache shared by runs: `$ATTRIBUTION_CACHE/tokens` or `~/.cache/attribution/tokens`."""
    root = os.environ.get("ATTRIBUTION_CACHE") or Path.home() / ".cache" / "attribution"
    return Path(root) / "tokens"


def _text_key(text: str) -> str:
    return hashlib.blake2b(text.strip().encode("utf-8"), digest_size=16).hexdigest()


def load_validation(cfg: RunConfig) -> dict[str, ValData]:
    """Read and tokenize every `--val NAME=PATH`; per-example values for sets of <= per_example_max docs."""
    from attribution.corpus import read_validation
    from attribution.tokens import EOS_ID, chunk_document, encode_texts

    out: dict[str, ValData] = {}
    for name, path in cfg.val.items():
        docs = read_validation(path)
        if not docs:
            raise UserError(f"{path}: validation set {name!r} has no documents")
        ids_list, mask_list, owner = [], [], []
        for row, tokens in enumerate(encode_texts([d.text for d in docs])):
            s_ids, s_mask = chunk_document(np.append(tokens, np.int32(EOS_ID)), cfg.seq_len)
            ids_list.append(s_ids)
            mask_list.append(s_mask)
            owner.extend([row] * len(s_ids))
        out[name] = ValData(
            name=name,
            path=str(path),
            docs=docs,
            ids=np.concatenate(ids_list).astype(np.int64),
            mask=np.concatenate(mask_list).astype(np.int64),
            seq_doc=np.asarray(owner, dtype=np.int64),
            per_example=len(docs) <= cfg.per_example_max,
        )
    return out


def load_training(cfg: RunConfig, val: dict[str, ValData], cache_dir: Path, info) -> TrainData:
    """Tokenize (or load cached) corpus; keep out `exclude_ids` and documents identical to a validation text."""
    from attribution.corpus import corpus_fingerprint, read_corpus, resolve_corpus
    from attribution.tokens import build_sequences

    paths: list[Path] = []
    for spec in cfg.corpus:
        paths.extend(resolve_corpus(spec))
    fingerprint = corpus_fingerprint(paths)
    if info.is_main:
        seqset = build_sequences(read_corpus(paths), cfg.seq_len, cache_dir, fingerprint)
    dist_util.barrier(info)  # the other ranks load what rank 0 built
    if not info.is_main:
        seqset = build_sequences(read_corpus(paths), cfg.seq_len, cache_dir, fingerprint)

    excluded = set(map(str, cfg.exclude_ids))
    val_keys = {_text_key(d.text) for v in val.values() for d in v.docs}
    identical: list[str] = []
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(seqset.path / "docs_text.parquet").iter_batches(batch_size=2048):
        for doc_id, text in zip(batch.column("doc_id").to_pylist(), batch.column("text").to_pylist(), strict=True):
            if _text_key(text) in val_keys and doc_id not in excluded:
                identical.append(doc_id)
    if identical and info.is_main:
        shown = ", ".join(identical[:5]) + (" ..." if len(identical) > 5 else "")
        warnings.warn(
            f"{len(identical)} training document(s) are identical to a validation text and are not trained on: {shown}",
            stacklevel=2,
        )
    keep = ~seqset.docs["doc_id"].astype(str).isin(excluded | set(identical)).to_numpy()
    doc_rows = np.flatnonzero(keep)
    store_row = np.full(len(seqset.docs), -1, dtype=np.int64)
    store_row[doc_rows] = np.arange(len(doc_rows))
    store_row_of_seq = store_row[np.asarray(seqset.seq_doc)]
    train_seqs = np.flatnonzero(store_row_of_seq >= 0)
    if len(train_seqs) == 0:
        raise UserError("no training sequences left after excluding validation texts and exclude_ids")
    return TrainData(
        seqset=seqset,
        fingerprint=fingerprint,
        train_seqs=train_seqs,
        doc_rows=doc_rows,
        store_row_of_seq=store_row_of_seq,
        dropped_identical=identical,
        excluded=int(seqset.docs["doc_id"].astype(str).isin(excluded).sum()),
    )


class Sampler:
    """An endless stream of sequence indices: epoch e is `default_rng([seed, e]).permutation`."""

    def __init__(self, items: np.ndarray, seed: int):
        self.items = np.asarray(items, dtype=np.int64)
        self.seed = int(seed)
        self._epoch = -1
        self._perm = self.items

    def take(self, position: int, k: int) -> np.ndarray:
        """The k indices at stream positions `position .. position + k - 1`."""
        n = len(self.items)
        out = np.empty(k, dtype=np.int64)
        for j in range(k):
            epoch, within = divmod(position + j, n)
            if epoch != self._epoch:
                self._perm = self.items[np.random.default_rng([self.seed, epoch]).permutation(n)]
                self._epoch = epoch
            out[j] = self._perm[within]
        return out


# ---------------------------------------------------------------------------------------------
# Model, optimizer, schedule


def resolve_device(cfg: RunConfig) -> tuple[str, str]:
    """(device, dtype name). `auto` = cuda with bfloat16 autocast when a GPU is present, else cpu float32."""
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no GPU is visible to torch")
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def build_model(cfg: RunConfig, device: str, dtype: str):
    """GPT-2 (transformers) from scratch, real 50257-token vocabulary, no dropout (as nanoGPT pretraining)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from attribution.tokens import EOS_ID, VOCAB_SIZE

    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=cfg.seq_len,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        attn_implementation="eager" if cfg.order == 2 and device == "cpu" else "sdpa",
    )
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(config)
    if dtype == "float64":
        model = model.double()
    return model.to(device).train()


def build_optimizer(model, cfg: RunConfig):
    """AdamW (decay on matrices only, as nanoGPT) or plain SGD (the values' own formula)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, foreach=False)


def lr_at(step: int, cfg: RunConfig, total: int) -> float:
    """Learning rate of 1-based `step`: linear warmup over `warmup_steps`, then cosine to `min_lr` at `total`."""
    warm = min(cfg.warmup_steps, max(total - 1, 0))
    if warm and step <= warm:
        return cfg.lr * step / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def evaluate(model, val: dict[str, ValData], device: str, batch: int = 16) -> dict[str, float]:
    """Mean per-sequence validation loss of each set (the loss the engine values against)."""
    import torch

    from attribution.engine.task import LanguageModelingTask

    task = LanguageModelingTask()
    was_training = model.training
    model.eval()
    out = {}
    with torch.no_grad():
        for name, v in val.items():
            losses = []
            for i in range(0, len(v.ids), batch):
                ids = torch.from_numpy(v.ids[i : i + batch]).to(device)
                mask = torch.from_numpy(v.mask[i : i + batch]).to(device)
                with _autocast(device, model):
                    losses.append(task.per_sequence_loss(model, ids, mask).double().cpu())
            out[name] = float(torch.cat(losses).mean())
    model.train(was_training)
    return out


def _autocast(device: str, model):
    """bfloat16 autocast on GPU for float32 weights; a no-op context elsewhere."""
    import contextlib

    import torch

    if device.startswith("cuda") and next(model.parameters()).dtype == torch.float32 and _BF16[0]:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


_BF16 = [False]  # set per run from the resolved dtype


# ---------------------------------------------------------------------------------------------
# Valuation


def make_valuer(model, val: dict[str, ValData], cfg: RunConfig):
    """The engine's Valuer over every validation set; per-example where the set is small enough."""
    import torch

    from attribution.engine.valuer import ValSet, Valuer

    device = next(model.parameters()).device
    sets = {
        name: ValSet(torch.from_numpy(v.ids).to(device), torch.from_numpy(v.mask).to(device),
                     [f"{v.docs[d].doc_id}#{i}" for i, d in enumerate(v.seq_doc)])
        for name, v in val.items()
    }
    per_example = [name for name, v in val.items() if v.per_example]
    # grad_norms: ghost per-sample gradient norms for the cosine view (per-example sets only)
    return Valuer(model, sets, order=cfg.order, per_example=per_example, optimizer_aware=cfg.optimizer_aware,
                  grad_norms=bool(per_example),
                  autocast_dtype=torch.bfloat16 if _BF16[0] and device.type == "cuda" else None)


def _per_doc_columns(matrix: np.ndarray, v: ValData) -> np.ndarray:
    """Sum per-validation-sequence columns into per-validation-document columns."""
    out = np.zeros((matrix.shape[0], len(v.docs)), dtype=np.float64)
    np.add.at(out.T, v.seq_doc, matrix.T)
    return out


def _gather_step(info, sv, val: dict[str, ValData], scale: float) -> tuple[dict, dict, dict]:
    """This step's values for the global batch (rank order), per set and per validation document,
    and (when the engine gave norms) per document the sum of its sequences' cosine-normalized values."""
    per_set = {name: dist_util.gather_rows(info, np.asarray(sv.per_set[name], dtype=np.float64) * scale)
               for name in val}
    per_example, per_example_cos = {}, {}
    for name, v in val.items():
        if v.per_example and name in sv.per_example:
            raw = np.asarray(sv.per_example[name], dtype=np.float64) * scale
            per_example[name] = dist_util.gather_rows(info, _per_doc_columns(raw, v))
            vn = sv.val_example_sq_norm.get(name)
            if sv.train_grad_sq_norm is not None and vn is not None:
                denom = np.sqrt(np.outer(np.asarray(sv.train_grad_sq_norm, dtype=np.float64), vn))
                cos = np.divide(raw, denom, out=np.zeros_like(raw), where=denom > 0)
                per_example_cos[name] = dist_util.gather_rows(info, _per_doc_columns(cos, v))
    return per_set, per_example, per_example_cos


# ---------------------------------------------------------------------------------------------
# Logs and manifest


class TrainLog:
    """`train_log.csv`, appended as the run goes (rows beyond a resumed checkpoint are dropped)."""

    def __init__(self, path: Path, set_names: list[str]):
        self.path = path
        self.columns = ["step", "lr", "train_loss", *[f"val_loss[{n}]" for n in set_names], "tokens_per_s"]

    def start(self, resume_step: int | None) -> None:
        if resume_step is None or not self.path.exists():
            with atomic_write(self.path) as fh:
                csv.writer(fh).writerow(self.columns)
            return
        with open(self.path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh)]
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= resume_step]
        with atomic_write(self.path) as fh:
            csv.writer(fh).writerows(kept)

    def write(self, step: int, lr: float | None, loss: float | None, val: dict[str, float] | None,
              tps: float | None) -> None:
        val = val or {}
        row = [step, _fmt(lr), _fmt(loss), *[_fmt(val.get(c[9:-1])) for c in self.columns[3:-1]], _fmt(tps)]
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow(row)


def _fmt(x: float | None) -> str:
    return "" if x is None else repr(float(x))


def git_commit() -> str | None:
    """The commit of the package's checkout, when it is a git checkout."""
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    """Versions of what decides the numbers."""
    import numpy
    import torch
    import transformers

    from attribution import __version__

    return {"attribution": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__, "platform": platform.platform()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _write_docs_parquet(out: Path, data: TrainData) -> None:
    """docs.parquet: the valued documents with their token counts and text (streamed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = data.seqset.docs
    keep = set(docs["doc_id"].iloc[data.doc_rows].astype(str))
    meta = docs.set_index("doc_id")
    with atomic_path(out / "docs.parquet") as tmp:
        writer = None
        try:
            for batch in pq.ParquetFile(data.seqset.path / "docs_text.parquet").iter_batches(batch_size=4096):
                frame = batch.to_pandas()
                frame = frame[frame["doc_id"].isin(keep)]
                if frame.empty:
                    continue
                m = meta.loc[frame["doc_id"]]
                part = pd.DataFrame({
                    "doc_id": frame["doc_id"].to_numpy(), "source": m["source"].to_numpy(),
                    "owner": m["owner"].to_numpy(), "license": m["license"].to_numpy(),
                    "n_tokens": m["n_tokens"].to_numpy(), "n_seqs": m["n_seqs"].to_numpy(),
                    "text": frame["text"].to_numpy(),
                })
                table = pa.Table.from_pandas(part, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table.cast(writer.schema))
        finally:
            if writer is not None:
                writer.close()


def _write_val_copies(out: Path, val: dict[str, ValData]) -> None:
    for name, v in val.items():
        with atomic_write(out / "val_sets" / f"{name}.jsonl") as fh:
            for d in v.docs:
                fh.write(json.dumps({"id": d.doc_id, "text": d.text, "meta": d.meta}, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# The run


def _tqdm(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", disable=not enabled,
                dynamic_ncols=True, file=sys.stderr)


def train_and_value(cfg: RunConfig, *, sources: dict[str, Any] | None = None) -> Path:
    """Train GPT-2 on `cfg.corpus` and value every document against every validation set.

    Returns the run directory. `sources` (optional) records where each setting came from
    (CLI flags, TOML file) for the manifest.
    """
    import torch

    cfg = cfg.resolved()
    out = Path(cfg.out)
    device, dtype = resolve_device(cfg)
    _BF16[0] = dtype == "bfloat16"
    info = dist_util.init_from_env(device)
    if device == "cuda" and info.enabled:
        device = f"cuda:{info.local_rank}"
        torch.cuda.set_device(info.local_rank)
    torch.use_deterministic_algorithms(device == "cpu", warn_only=True)
    started = time.time()
    try:
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if not cfg.resume and (out / ckpt.CHECKPOINT_DIR).exists():
                raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        dist_util.barrier(info)
        val = load_validation(cfg)
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        data = load_training(cfg, val, cache_dir, info)
        total = cfg.total_steps(len(data.train_seqs))
        model = build_model(cfg, device, dtype)
        optimizer = build_optimizer(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        valuer = make_valuer(model, val, cfg) if cfg.value else None
        set_names = list(val)
        store = (
            ValueStore(
                out, data.docs, data.store_row_of_seq, set_names,
                {n: v.example_ids for n, v in val.items() if v.per_example}, cfg.stage_window,
            )
            if info.is_main and cfg.value
            else None
        )
        log = TrainLog(out / "train_log.csv", set_names)

        step, position, resumed_from, prior_seconds = 0, 0, None, 0.0
        if cfg.resume:
            if info.is_main:
                ckpt.recover(out)  # repair an interrupted swap once, before every rank reads
            dist_util.barrier(info)
            loaded = ckpt.load_checkpoint(out, model, optimizer, device=device)
            if loaded is not None:
                state = loaded.state
                if state["fingerprint"] != data.fingerprint or state["total_steps"] != total:
                    raise UserError(f"{out}: the checkpoint is of a different corpus or length; use a new --out")
                step, position = int(state["step"]), int(state["position"])
                resumed_from, prior_seconds = step, float(state.get("train_seconds", 0.0))
                torch.set_rng_state(loaded.state["rng"]["torch"])
                if store is not None:
                    store.load_state_arrays(loaded.arrays)
                    store.discard_after(step)
        if info.is_main:
            log.start(resumed_from)
            _write_val_copies(out, val)
            _write_manifest(out, cfg, sources, data, val, info, device, dtype, total, status="running",
                            timings={"started": started}, store=store, resumed_from=resumed_from)
            if step == 0:
                log.write(0, None, None, evaluate(model, val, device), None)

        sampler = Sampler(data.train_seqs, cfg.seed)
        rows = dist_util.local_slice(info, cfg.batch_size)
        local_n = rows.stop - rows.start
        ids_all, mask_all = data.seqset.ids, data.seqset.mask
        tokens_done, t_interval, t_train0 = 0, time.perf_counter(), time.perf_counter()
        flushed_through = step
        bar = _tqdm(total, step, cfg.progress and info.is_main)
        last_val: dict[str, float] = {}
        while step < total:
            batch_idx = sampler.take(position, cfg.batch_size)
            mine = batch_idx[rows]
            ids = torch.from_numpy(np.asarray(ids_all[mine], dtype=np.int64)).to(device)
            mask = torch.from_numpy(np.asarray(mask_all[mine], dtype=np.int64)).to(device)
            step += 1
            lr = lr_at(step, cfg, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if valuer is not None:  # the engine applies autocast itself
                loss = valuer.forward_backward(ids, mask)
            else:
                with _autocast(device, model):
                    loss = _plain_forward_backward(model, ids, mask)
            dist_util.average_gradients(info, params)
            loss = dist_util.average_scalar(info, float(loss))
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            grad_scale = float(torch.clamp(cfg.clip / (norm + 1e-6), max=1.0))
            sv = None
            if valuer is not None:
                kwargs = {"grad_scale": grad_scale}
                if cfg.optimizer_aware:
                    kwargs["optimizer"] = optimizer
                sv = valuer.values(lr, **kwargs)
            optimizer.step()
            if valuer is not None:
                after = valuer.after_step()
                sv = after if cfg.order == 2 else sv
            optimizer.zero_grad(set_to_none=True)
            position += cfg.batch_size
            if sv is not None:
                # The engine scales by 1/(its local batch); the step used the mean over the global batch.
                per_set, per_example, per_example_cos = _gather_step(info, sv, val, local_n / cfg.batch_size)
                if store is not None:
                    store.add(step, batch_idx, per_set, per_example, per_example_cos)
            tokens_done += int(mask.sum()) * info.world
            bar.update(1)
            if info.is_main and (step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == total):
                now = time.perf_counter()
                tps = tokens_done / max(now - t_interval, 1e-9)
                tokens_done, t_interval = 0, now
                vals = evaluate(model, val, device) if (step % cfg.eval_every == 0 or step == total) else None
                if vals:
                    last_val = vals
                log.write(step, lr, loss, vals, tps)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}",
                                **({"val": f"{np.mean(list(last_val.values())):.3f}"} if last_val else {}))
            if step % cfg.checkpoint_every == 0 or step == total:
                if store is not None:
                    store.flush(flushed_through + 1, step)
                flushed_through = step
                if info.is_main:
                    seconds = prior_seconds + time.perf_counter() - t_train0
                    ckpt.save_checkpoint(
                        out, model, optimizer,
                        {"step": step, "position": position, "total_steps": total, "fingerprint": data.fingerprint,
                         "seed": cfg.seed, "train_seconds": seconds, "config": cfg.to_json()},
                        store.state_arrays() if store is not None else {},
                        {"torch": torch.get_rng_state()},
                    )
                dist_util.barrier(info)
        bar.close()
        if valuer is not None and hasattr(valuer, "finish"):
            valuer.finish()
        train_seconds = prior_seconds + time.perf_counter() - t_train0
        if info.is_main:
            if store is not None:
                store.finalize()
            _write_docs_parquet(out, data)
            final_val = evaluate(model, val, device)
            _write_manifest(out, cfg, sources, data, val, info, device, dtype, total, status="complete",
                            timings={"started": started, "finished": time.time(), "train_seconds": train_seconds,
                                     "tokens_per_s": total * cfg.batch_size * cfg.seq_len / max(train_seconds, 1e-9)},
                            store=store, resumed_from=resumed_from, final_val=final_val)
        return out
    finally:
        dist_util.shutdown(info)


def _plain_forward_backward(model, ids, mask) -> float:
    """Plain training step's loss and backward (the throughput baseline): same loss as the engine's."""
    from attribution.engine.task import LanguageModelingTask

    loss = LanguageModelingTask().per_sequence_loss(model, ids, mask).mean()
    loss.backward()
    return float(loss.detach())


def _write_manifest(out: Path, cfg: RunConfig, sources, data: TrainData, val: dict[str, ValData], info, device: str,
                    dtype: str, total: int, *, status: str, timings: dict, store: ValueStore | None,
                    resumed_from: int | None, final_val: dict[str, float] | None = None) -> None:
    """manifest.json (`attribution.values.Manifest`): enough to repeat the run and to know what its numbers mean."""
    from attribution.values.manifest import CorpusInfo, Manifest, Timings, TrainingInfo, ValSetInfo

    previous = Manifest.read(out) if (out / "manifest.json").exists() else None
    resumes = previous.resumed_from if previous is not None else []
    resuming = resumed_from is not None and status == "running"
    if resuming:
        resumes = [*resumes, resumed_from]
    # the first session's start is kept; each resumed session adds its own start to `resumed_at`
    before = previous.timings if previous is not None else Timings()
    now = Timings(**timings)
    merged = Timings(started=before.started if before.started is not None else now.started,
                     finished=now.finished if now.finished is not None else before.finished,
                     train_seconds=now.train_seconds if now.train_seconds is not None else before.train_seconds,
                     tokens_per_s=now.tokens_per_s if now.tokens_per_s is not None else before.tokens_per_s,
                     resumed_at=[*before.resumed_at, now.started] if resuming else before.resumed_at)
    manifest = Manifest(
        status=status,
        config=cfg.to_json(),
        config_sources=sources or {},
        seed=cfg.seed,
        corpus=CorpusInfo(specs=cfg.corpus, fingerprint=data.fingerprint, n_docs_total=len(data.seqset.docs),
                          n_docs_trained=len(data.doc_rows), n_sequences=len(data.train_seqs),
                          excluded_ids=data.excluded, identical_to_validation=data.dropped_identical),
        val_sets={name: ValSetInfo(path=v.path, n_docs=len(v.docs), n_sequences=len(v.ids), per_example=v.per_example)
                  for name, v in val.items()},
        training=TrainingInfo(total_steps=total, device=device, dtype=dtype, world_size=info.world,
                              tokens_per_step=cfg.batch_size * cfg.seq_len, order=cfg.order, optimizer=cfg.optimizer,
                              values="sgd-proxy" if not cfg.optimizer_aware else "adam-aware",
                              clip="values are for the clipped step: scaled by min(1, clip/(||g||+1e-6))",
                              weight_decay_credit="none (data-independent shrink)"),
        values=store.describe() if store is not None else None,
        final_val_loss=final_val,
        timings=merged,
        peak_rss_mb=peak_rss_mb(),
        versions=versions(),
        git_commit=git_commit(),
        resumed_from=resumes,
    )
    manifest.write(out)
