"""The training loop: GPT-2 from scratch, nanoGPT style, with the engine valuing every step.

One step: the learning rate (linear warmup, then cosine to `min_lr`), then
`attribution.train.step.ValuedStep.run`, which owns the order that decides what a value means
(forward/backward through the engine, gradients averaged over ranks, clipping with the clip factor
passed to the engine, first-order values, `optimizer.step()`, second-order values), then the batch's
values go to the value store (rank 0), per document. `train_and_value` reads top to bottom: set up,
resume, train (log, evaluate, checkpoint), finish.

Weight decay (AdamW) shrinks every weight by the same factor whatever the batch, so it is credited
to no document. With AdamW the values are Adam-preconditioned by default (`optimizer_aware`: the step
actually taken); `optimizer_aware=False` (`--sgd-proxy`) uses the SGD formula as a proxy, as the paper does.

Determinism: the model is initialised from `seed`; batches are a seeded permutation of the training
sequences per epoch (epoch e uses `default_rng([seed, e])`), read as one endless stream, so the
sampler state is a single integer (the stream position) stored in the checkpoint with the torch RNG
states. Same seed, same batches, same init, same values.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
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
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from attribution.errors import UserError
from attribution.io import atomic_path, atomic_write
from attribution.train import chain, reference
from attribution.train import checkpoint as ckpt
from attribution.train import distributed as dist_util
from attribution.train.config import RunConfig
from attribution.train.store import ValueStore
from attribution.values.views import default_for

if TYPE_CHECKING:
    from attribution.train.step import ValuedStep

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
    reference_rows: np.ndarray = field(
        default_factory=lambda: np.zeros(0, dtype=np.int64)
    )  # seqset.docs rows
    reference_texts: ValData | None = None  # `--reference-texts`, tokenized

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

    out: dict[str, ValData] = {}
    for name, path in cfg.val.items():
        docs = read_validation(path)
        if not docs:
            raise UserError(f"{path}: validation set {name!r} has no documents")
        out[name] = _tokenized(name, str(path), docs, cfg.seq_len, len(docs) <= cfg.per_example_max)
    return out


def val_fingerprint(val: dict[str, ValData]) -> str:
    """What a run's values are columns of: every set's name and its texts' ids and token ids. A resume must
    find the same, or the accumulators would add up values against different texts."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(val):
        v = val[name]
        h.update(json.dumps([name, v.example_ids, bool(v.per_example)]).encode())
        h.update(np.ascontiguousarray(v.ids, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(v.seq_doc, dtype=np.int64).tobytes())
    return h.hexdigest()


def _tokenized(name: str, path: str, docs: list, seq_len: int, per_example: bool) -> ValData:
    """Texts as the engine values them: each text and its EOS cut into `seq_len` sequences (`seq_doc`)."""
    from attribution.tokens import EOS_ID, chunk_document, encode_texts

    ids_list, mask_list, owner = [], [], []
    for row, tokens in enumerate(encode_texts([d.text for d in docs])):
        s_ids, s_mask = chunk_document(np.append(tokens, np.int32(EOS_ID)), seq_len)
        ids_list.append(s_ids)
        mask_list.append(s_mask)
        owner.extend([row] * len(s_ids))
    return ValData(
        name=name,
        path=path,
        docs=docs,
        ids=np.concatenate(ids_list).astype(np.int64),
        mask=np.concatenate(mask_list).astype(np.int64),
        seq_doc=np.asarray(owner, dtype=np.int64),
        per_example=per_example,
    )


def load_reference_texts(cfg: RunConfig) -> ValData | None:
    """`--reference-texts`: the texts the reference set holds besides its corpus documents, valued whole."""
    from attribution.corpus import read_validation

    docs = []
    for path in cfg.reference_texts:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such reference-texts file (--reference-texts)")
        docs += [
            dataclasses.replace(d, meta={**d.meta, "reference": True, "valued_on": "whole text"})
            for d in read_validation(path)
        ]
    if not docs:
        return None
    seen: set[str] = set()
    for d in docs:
        if d.doc_id in seen:
            raise UserError(f"{', '.join(cfg.reference_texts)}: reference text id {d.doc_id!r} appears twice")
        seen.add(d.doc_id)
    return _tokenized(reference.NAME, ", ".join(cfg.reference_texts), docs, cfg.seq_len, True)


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
    ref_texts = load_reference_texts(cfg)
    val_keys = {
        _text_key(d.text) for v in [*val.values(), *([ref_texts] if ref_texts else [])] for d in v.docs
    }
    identical: list[str] = []
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(seqset.path / "docs_text.parquet").iter_batches(batch_size=2048):
        for doc_id, text in zip(
            batch.column("doc_id").to_pylist(), batch.column("text").to_pylist(), strict=True
        ):
            if _text_key(text) in val_keys and doc_id not in excluded:
                identical.append(doc_id)
    if identical and info.is_main:
        shown = ", ".join(identical[:5]) + (" ..." if len(identical) > 5 else "")
        warnings.warn(
            f"{len(identical)} training document(s) are identical to a validation text and are not trained on: {shown}",
            stacklevel=2,
        )
    held_out = set(identical) | excluded
    # the reference is held out of training, so it never takes a document the run must train on
    not_reference = held_out | set(map(str, cfg.keep_ids))
    ref_rows = reference.choose(seqset.docs, cfg.reference or 0, cfg.seed, exclude=not_reference)
    held_out |= set(seqset.docs["doc_id"].astype(str).iloc[ref_rows])
    keep = ~seqset.docs["doc_id"].astype(str).isin(held_out).to_numpy()
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
        reference_rows=np.asarray(ref_rows, dtype=np.int64),
        reference_texts=ref_texts,
    )


def reference_set(data: TrainData) -> ValData | None:
    """The run's fixed reference set (`attribution.train.reference`): each held-out document's first
    sequence, then the `--reference-texts`, each whole (one example of one or more sequences)."""
    sampled = _sampled_reference(data)
    texts = data.reference_texts
    if sampled is None or texts is None:
        return sampled or texts
    clash = {d.doc_id for d in sampled.docs} & {d.doc_id for d in texts.docs}
    if clash:
        raise UserError(
            f"{texts.path}: reference text id(s) {', '.join(sorted(clash)[:5])} are also corpus documents "
            "in the reference set; give the texts other ids"
        )
    return ValData(
        name=reference.NAME,
        path=f"{sampled.path}; {texts.path}",
        docs=sampled.docs + texts.docs,
        ids=np.concatenate([sampled.ids, texts.ids]),
        mask=np.concatenate([sampled.mask, texts.mask]),
        seq_doc=np.concatenate([sampled.seq_doc, texts.seq_doc + len(sampled.docs)]),
        per_example=True,
    )


def _sampled_reference(data: TrainData) -> ValData | None:
    from attribution.corpus import Document

    rows = data.reference_rows
    if len(rows) == 0:
        return None
    seqset = data.seqset
    first = {int(d): i for i, d in reversed(list(enumerate(np.asarray(seqset.seq_doc))))}
    seqs = np.asarray([first[int(r)] for r in rows], dtype=np.int64)
    meta = seqset.docs.iloc[rows]
    docs = [
        Document(
            str(m.doc_id),
            seqset.text(str(m.doc_id)),
            str(m.source),
            str(m.owner),
            meta={"reference": True, "valued_on": "first sequence"},
        )
        for m in meta.itertuples()
    ]
    return ValData(
        name=reference.NAME,
        path="(held out of the training corpus)",
        docs=docs,
        ids=np.asarray(seqset.ids[seqs], dtype=np.int64),
        mask=np.asarray(seqset.mask[seqs], dtype=np.int64),
        seq_doc=np.arange(len(rows), dtype=np.int64),
        per_example=True,
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


def gpt2_config(
    n_layer: int,
    n_head: int,
    n_embd: int,
    n_positions: int,
    *,
    vocab_size: int | None = None,
    dropout: float = 0.0,
    attn_implementation: str = "sdpa",
):
    """The GPT-2 configuration a run trains: the real vocabulary, no dropout (as nanoGPT pretraining).
    Benchmarks build their models here too, so that a timing measures the model the product trains."""
    from transformers import GPT2Config

    from attribution.tokens import EOS_ID, VOCAB_SIZE

    return GPT2Config(
        vocab_size=vocab_size or VOCAB_SIZE,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        attn_implementation=attn_implementation,
    )


def attention_for(order: int, device: str) -> str:
    """The attention kernel a run uses: eager at second order on the CPU, fused SDPA otherwise.

    Why eager there: fused SDPA has no double backward on the CPU, which the exact second-order checks
    once took on the run's model. No run path differentiates twice now; the rule is kept because a claim
    replays a run bit for bit with the kernel it was trained with, and it costs nothing measurable
    (docs/benchmarks.md, "Session 17"). Replays and benchmarks ask here, so that they build the run's model."""
    return "eager" if order == 2 and device == "cpu" else "sdpa"


def build_model(cfg: RunConfig, device: str, dtype: str):
    """GPT-2 (transformers) from scratch, as `gpt2_config` describes it."""
    import torch
    from transformers import GPT2LMHeadModel

    from attribution.train.blocked_head import block_head

    config = gpt2_config(
        cfg.n_layer,
        cfg.n_head,
        cfg.n_embd,
        cfg.seq_len,
        attn_implementation=attention_for(cfg.order, device),
    )
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(config)
    if device == "cpu":
        block_head(model.lm_head)  # the same logits, 1.2-2.7x faster on this machine's BLAS
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


def make_step(model, val: dict[str, ValData], cfg: RunConfig, info) -> ValuedStep:
    """The valued step: the engine's Valuer over every validation set (per-example where the set is small
    enough), or plain training when `cfg.value` is off."""
    import torch

    from attribution.engine.valuer import ValSet, Valuer
    from attribution.train.step import PlainTraining, ValuedStep

    device = next(model.parameters()).device
    autocast_dtype = torch.bfloat16 if _BF16[0] and device.type == "cuda" else None
    per_example = [name for name, v in val.items() if v.per_example]
    if cfg.value:
        sets = {
            # a per-example set's columns are its documents: the engine sums each document's sequences
            name: ValSet(
                torch.from_numpy(v.ids).to(device),
                torch.from_numpy(v.mask).to(device),
                [d.doc_id for d in v.docs] if v.per_example else None,
                groups=v.seq_doc if v.per_example else None,
            )
            for name, v in val.items()
        }
        # grad_norms: ghost per-sample gradient norms for the in-run cosine views (per-example sets only)
        valuer = Valuer(
            model,
            sets,
            order=cfg.order,
            per_example=per_example,
            optimizer_aware=cfg.adam_aware,
            grad_norms=bool(per_example) and bool(cfg.in_run_cosine),
            autocast_dtype=autocast_dtype,
        )
    else:
        valuer = PlainTraining(model, autocast_dtype=autocast_dtype)
    return ValuedStep(model, valuer, info, max_grad_norm=cfg.clip)


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

    def write(
        self, step: int, lr: float | None, loss: float | None, val: dict[str, float] | None, tps: float | None
    ) -> None:
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
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    """Versions of what decides the numbers."""
    import numpy
    import torch
    import transformers

    from attribution import __version__

    return {
        "attribution": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


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
                part = pd.DataFrame(
                    {
                        "doc_id": frame["doc_id"].to_numpy(),
                        "source": m["source"].to_numpy(),
                        "owner": m["owner"].to_numpy(),
                        "license": m["license"].to_numpy(),
                        "n_tokens": m["n_tokens"].to_numpy(),
                        "n_seqs": m["n_seqs"].to_numpy(),
                        "text": frame["text"].to_numpy(),
                    }
                )
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
                fh.write(
                    json.dumps({"id": d.doc_id, "text": d.text, "meta": d.meta}, ensure_ascii=False) + "\n"
                )


# ---------------------------------------------------------------------------------------------
# The run


def _tqdm(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="training",
        unit="step",
        disable=not enabled,
        dynamic_ncols=True,
        file=sys.stderr,
    )


@dataclass
class _Session:
    """What the phases of one run share; `step` and `position` (in the batch stream) advance as it trains."""

    cfg: RunConfig
    sources: dict[str, Any] | None
    info: dist_util.DistInfo
    device: str
    dtype: str
    started: float
    val: dict[str, ValData]
    data: TrainData
    total: int
    model: Any
    optimizer: Any
    valued_step: ValuedStep
    store: ValueStore | None
    log: TrainLog
    sketch: Any = None  # attribution.train.sketch.InRunSketch, or None (--no-sketch, no values)
    step: int = 0
    position: int = 0
    resumed_from: int | None = None
    prior_seconds: float = 0.0

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @functools.cached_property
    def val_key(self) -> str:
        """`val_fingerprint` of this run's texts, recorded in every checkpoint and checked on resume."""
        return val_fingerprint(self.val)


def train_and_value(cfg: RunConfig, *, sources: dict[str, Any] | None = None) -> Path:
    """Train GPT-2 on `cfg.corpus` and value every document against every validation set.

    Returns the run directory. `sources` (optional) records where each setting came from
    (CLI flags, TOML file) for the manifest.
    """
    cfg = cfg.resolved()
    device, dtype = resolve_device(cfg)
    _BF16[0] = dtype == "bfloat16"
    info = dist_util.init_from_env(device)
    device = _place(device, info)
    started = time.time()
    try:
        run = _setup(cfg, sources, info, device, dtype, started)
        _resume(run)
        _start_files(run)
        train_seconds = _train(run)
        _finish_files(run, train_seconds)
        return run.out
    finally:
        dist_util.shutdown(info)


def _place(device: str, info: dist_util.DistInfo) -> str:
    """This rank's device (its own GPU under torchrun); deterministic kernels on CPU."""
    import torch

    if device == "cuda" and info.enabled:
        device = f"cuda:{info.local_rank}"
        torch.cuda.set_device(info.local_rank)
    torch.use_deterministic_algorithms(device == "cpu", warn_only=True)
    return device


def _setup(cfg: RunConfig, sources, info, device: str, dtype: str, started: float) -> _Session:
    """Check the output folder, read the data, build the model, optimizer, valued step, store and log."""
    out = Path(cfg.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume and (out / ckpt.CHECKPOINT_DIR).exists():
            raise UserError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out"
            )
    dist_util.barrier(info)
    val = load_validation(cfg)
    data = load_training(cfg, val, Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(), info)
    ref = reference_set(data) if cfg.value else None
    if ref is not None:
        val[ref.name] = ref
    total = cfg.total_steps(len(data.train_seqs))
    model = build_model(cfg, device, dtype)
    optimizer = build_optimizer(model, cfg)
    valued_step = make_step(model, val, cfg, info)
    store = (
        ValueStore(
            out,
            data.docs,
            data.store_row_of_seq,
            list(val),
            {n: v.example_ids for n, v in val.items() if v.per_example},
            cfg.stage_window,
        )
        if info.is_main and cfg.value
        else None
    )
    return _Session(
        cfg,
        sources,
        info,
        device,
        dtype,
        started,
        val,
        data,
        total,
        model,
        optimizer,
        valued_step,
        store,
        TrainLog(out / "train_log.csv", list(val)),
        _make_sketch(cfg, model, valued_step, data, total, info),
    )


def _make_sketch(cfg: RunConfig, model, valued_step: ValuedStep, data: TrainData, total: int, info):
    """The in-run gradient sketch (`attribution.train.sketch`), fed by the valuer's captures; needs values."""
    if not (cfg.sketch and cfg.value):
        return None
    from attribution.train.sketch import BALANCED, InRunSketch, segments

    sketch = InRunSketch(
        model,
        cfg.sketch_dim,
        cfg.seed,
        segments(cfg.keep_every or 0, total),
        data.store_row_of_seq,
        data.docs["doc_id"].astype(str).tolist(),
        info,
        side=cfg.sketch_side,
        preconditioner=BALANCED if cfg.adam_aware else None,
        kind=cfg.sketch_kind,
        width=cfg.sketch_width,
        mix=cfg.sketch_mix,
    )
    sketch.attach(valued_step)
    return sketch


def _resume(run: _Session) -> None:
    """`--resume`: weights, optimizer, stream position, RNG state and the values so far, from the checkpoint."""
    import torch

    if not run.cfg.resume:
        return
    if run.info.is_main:
        ckpt.recover(run.out)  # repair an interrupted swap once, before every rank reads
    dist_util.barrier(run.info)
    loaded = ckpt.load_checkpoint(run.out, run.model, run.optimizer, device=run.device)
    if loaded is None:
        return
    state = loaded.state
    if state["fingerprint"] != run.data.fingerprint or state["total_steps"] != run.total:
        raise UserError(f"{run.out}: the checkpoint is of a different corpus or length; use a new --out")
    if state.get("val_fingerprint", run.val_key) != run.val_key:  # older checkpoints: unchecked
        raise UserError(
            f"{run.out}: the checkpoint was valued against other validation or reference texts; resume with "
            "the same --val and --reference-texts, or use a new --out"
        )
    run.step, run.position = int(state["step"]), int(state["position"])
    run.resumed_from, run.prior_seconds = run.step, float(state.get("train_seconds", 0.0))
    torch.set_rng_state(state["rng"]["torch"])
    if run.info.is_main:
        chain.discard_after(run.out, run.step)
    # every rank checks (the arrays are on every rank): steps with and without cosines would make
    # `value_cosine` a partial sum
    had = ValueStore.had_cosines(loaded.arrays)
    if run.cfg.value and any(v.per_example for v in run.val.values()) and had != bool(run.cfg.in_run_cosine):
        raise UserError(
            f"{run.out}: the run was started {'with' if had else 'without'} in-run cosines; resume it "
            f"with {'--in-run-cosine' if had else '--no-in-run-cosine'}, as it was started"
        )
    if run.store is not None:
        run.store.load_state_arrays(loaded.arrays)
        run.store.discard_after(run.step)
    if run.sketch is not None and not run.sketch.load_state_arrays(loaded.arrays):
        warnings.warn(
            "the checkpoint holds no gradient sketch of this run's projection (none, or one made with other "
            "sketch settings or older code); this run will write none",
            stacklevel=2,
        )
        run.sketch = None


def _start_files(run: _Session) -> None:
    """Rank 0: the log, copies of the validation sets, a "running" manifest, and step 0's validation loss."""
    if not run.info.is_main:
        return
    run.log.start(run.resumed_from)
    _write_val_copies(run.out, run.val)
    _write_manifest(
        run.out,
        run.cfg,
        run.sources,
        run.data,
        run.val,
        run.info,
        run.device,
        run.dtype,
        run.total,
        status="running",
        timings={"started": run.started},
        store=run.store,
        resumed_from=run.resumed_from,
    )
    if run.step == 0:
        run.log.write(0, None, None, evaluate(run.model, run.val, run.device), None)
        _keep_link(run)


def _train(run: _Session) -> float:
    """The loop, one valued step per batch; returns the training seconds (resumed sessions included)."""
    cfg = run.cfg
    sampler = Sampler(run.data.train_seqs, cfg.seed)
    rows = dist_util.local_slice(run.info, cfg.batch_size)
    progress = _Progress(run)
    t_train0 = time.perf_counter()
    flushed_through = run.step
    while run.step < run.total:
        batch_idx = sampler.take(run.position, cfg.batch_size)
        ids, mask = _on_device(run.data, batch_idx[rows], run.device)
        run.step += 1
        lr = lr_at(run.step, cfg, run.total)
        loss, values = run.valued_step.run(ids, mask, lr, run.optimizer)
        run.position += cfg.batch_size
        if values is not None and run.store is not None:
            run.store.add(run.step, batch_idx, values.per_set, values.per_example, values.per_example_cos)
        if run.sketch is not None:
            run.sketch.add(run.step, batch_idx)
        progress.update(run, lr, loss, int(mask.sum()) * run.info.world)
        if run.step == progress.first_step:
            _print_memory_model(run)
        if run.step % cfg.checkpoint_every == 0 or run.step == run.total:
            _checkpoint(run, flushed_through, run.prior_seconds + time.perf_counter() - t_train0)
            flushed_through = run.step
        _keep_link(run)
    progress.close()
    run.valued_step.finish()
    return run.prior_seconds + time.perf_counter() - t_train0


def _print_memory_model(run: _Session) -> None:
    """After the first step, one line: what the valued step holds by the engine's memory model
    (`attribution.engine.memory`), so a user sees before a long run where its memory goes."""
    from tqdm import tqdm

    from attribution.engine.memory import step_memory

    valuer = run.valued_step.valuer
    plans = valuer.plans() if hasattr(valuer, "plans") else {}
    if not plans or not run.info.is_main or not run.cfg.progress:
        return
    itemsize = 2 if valuer.autocast_dtype is not None else next(run.model.parameters()).element_size()
    model = step_memory(
        plans,
        order=valuer.order,
        optimizer_aware=valuer.optimizer_aware,
        grad_norms=valuer.grad_norms,
        itemsize=itemsize,
        per_example=valuer.per_example,
    )
    parts = ", ".join(f"{what} {b / 2**20:,.0f}" for what, b in model.by_what().items() if b >= 2**20)
    tqdm.write(
        f"valued step holds about {model.total / 2**20:,.0f} MiB by the memory model ({parts} MiB); "
        "allocator slack and forward activations come on top (docs/benchmarks.md, 'Session 8')",
        file=sys.stderr,
    )


def _on_device(data: TrainData, seqs: np.ndarray, device: str):
    """(ids, mask) int64 tensors of these training sequences."""
    import torch

    ids = torch.from_numpy(np.asarray(data.seqset.ids[seqs], dtype=np.int64)).to(device)
    mask = torch.from_numpy(np.asarray(data.seqset.mask[seqs], dtype=np.int64)).to(device)
    return ids, mask


class _Progress:
    """The progress bar and, on rank 0, the train_log.csv rows (throughput since the previous row)."""

    def __init__(self, run: _Session):
        self.bar = _tqdm(run.total, run.step, run.cfg.progress and run.info.is_main)
        self.first_step = run.step + 1  # this session's first step (a resumed run starts later)
        self.tokens, self.since = 0, time.perf_counter()
        self.last_val: dict[str, float] = {}

    def update(self, run: _Session, lr: float, loss: float, tokens: int) -> None:
        """Count the step; every `log_every` steps a log row, every `eval_every` (and at the end) validation loss."""
        self.tokens += tokens
        self.bar.update(1)
        cfg, step = run.cfg, run.step
        evaluating = step % cfg.eval_every == 0 or step == run.total
        if not run.info.is_main or not (step % cfg.log_every == 0 or evaluating):
            return
        now = time.perf_counter()
        tps = self.tokens / max(now - self.since, 1e-9)
        self.tokens, self.since = 0, now
        vals = evaluate(run.model, run.val, run.device) if evaluating else None
        self.last_val = vals or self.last_val
        run.log.write(step, lr, loss, vals, tps)
        self.bar.set_postfix(
            loss=f"{loss:.3f}",
            tok_s=f"{tps:,.0f}",
            **({"val": f"{np.mean(list(self.last_val.values())):.3f}"} if self.last_val else {}),
        )

    def close(self) -> None:
        self.bar.close()


def _checkpoint(run: _Session, flushed_through: int, train_seconds: float) -> None:
    """Flush the values since the last checkpoint, then (rank 0) save weights, optimizer, position and RNG."""
    import torch

    if run.store is not None:
        run.store.flush(flushed_through + 1, run.step)
    if run.info.is_main:
        cfg = run.cfg
        ckpt.save_checkpoint(
            run.out,
            run.model,
            run.optimizer,
            {
                "step": run.step,
                "position": run.position,
                "total_steps": run.total,
                "fingerprint": run.data.fingerprint,
                "val_fingerprint": run.val_key,
                "seed": cfg.seed,
                "train_seconds": train_seconds,
                "config": cfg.to_json(),
            },
            {
                **(run.store.state_arrays() if run.store is not None else {}),
                **(run.sketch.state_arrays() if run.sketch is not None else {}),
            },
            {"torch": torch.get_rng_state()},
        )
    dist_util.barrier(run.info)


def _keep_link(run: _Session) -> None:
    """Rank 0: a replay-chain link at step 0, every `keep_every` steps and at the last step (claims replay them)."""
    import torch

    every = run.cfg.keep_every
    if not every or not run.info.is_main or not (run.step % every == 0 or run.step == run.total):
        return
    chain.save_link(
        run.out,
        run.step,
        run.model,
        run.optimizer,
        {"position": run.position, "total_steps": run.total},
        {"torch": torch.get_rng_state()},
        keep_every=every,
    )


def _finish_files(run: _Session, train_seconds: float) -> None:
    """Rank 0: the value files, docs.parquet, the final validation loss and the "complete" manifest."""
    if not run.info.is_main:
        return
    cfg = run.cfg
    if run.store is not None:
        run.store.finalize()
    _write_docs_parquet(run.out, run.data)
    if run.store is not None:
        run.store.default_view = default_for(_checkpoint_cosines(run))
    if run.sketch is not None:
        run.sketch.write(run.out)
    final_val = evaluate(run.model, run.val, run.device)
    timings = {
        "started": run.started,
        "finished": time.time(),
        "train_seconds": train_seconds,
        "tokens_per_s": run.total * cfg.batch_size * cfg.seq_len / max(train_seconds, 1e-9),
    }
    _write_manifest(
        run.out,
        cfg,
        run.sources,
        run.data,
        run.val,
        run.info,
        run.device,
        run.dtype,
        run.total,
        status="complete",
        timings=timings,
        store=run.store,
        resumed_from=run.resumed_from,
        final_val=final_val,
    )
    if cfg.keep_every and cfg.progress:
        kept = chain.links(run.out)
        print(
            f"replay chain: {len(kept)} checkpoints (every {cfg.keep_every} steps), "
            f"{chain.storage(run.out) / 2**20:.1f} MiB in {run.out / chain.REPLAY_DIR}; "
            "`attribution claim` can value texts against this run later",
            file=sys.stderr,
        )


def _checkpoint_cosines(run: _Session) -> bool:
    """The exact gradient similarity at the kept checkpoints (`checkpoint_values.parquet`), which the
    default view reads, and its sketch index for `claim --fast` (`--no-sketch`: none); whether the run
    has it. Needs the replay chain and per-example texts."""
    from attribution.workflows import checkpoint_similarity, checkpoint_sketch

    per_example = any(v.per_example for v in run.val.values())
    if not (run.cfg.checkpoint_view and per_example and chain.links(run.out)):
        return False
    table = run.out / checkpoint_similarity.TABLE
    if not table.is_file():  # a resumed run that got this far already has it (and its index)
        sink = None
        if run.cfg.sketch:
            try:
                sink = checkpoint_sketch.for_documents(run.out, run.cfg.sketch_dim, run.cfg.seed)
            except UserError as exc:  # more kept checkpoints than --sketch-dim: the run still finishes
                warnings.warn(f"no checkpoint sketch index for claim --fast: {exc}", stacklevel=1)
        frame = checkpoint_similarity.for_run(run.out, progress=run.cfg.progress, sink=sink)
        if sink is not None:  # the index first: a table on disk means its index is too
            checkpoint_sketch.write(run.out, sink, frame, power=checkpoint_similarity.POWER)
        checkpoint_similarity.write(run.out, frame)
    return True


def _indexes(out: Path) -> dict[str, Any]:
    """What the run's `claim --fast` indexes hold, for the manifest (none while the run trains)."""
    from attribution.train.sketch import SKETCH_DIR
    from attribution.train.sketch import describe as in_run
    from attribution.workflows import checkpoint_sketch

    found = {SKETCH_DIR: in_run(out), checkpoint_sketch.FOLDER: checkpoint_sketch.describe(out)}
    return {k: v for k, v in found.items() if v is not None}


def _write_manifest(
    out: Path,
    cfg: RunConfig,
    sources,
    data: TrainData,
    val: dict[str, ValData],
    info,
    device: str,
    dtype: str,
    total: int,
    *,
    status: str,
    timings: dict,
    store: ValueStore | None,
    resumed_from: int | None,
    final_val: dict[str, float] | None = None,
) -> None:
    """manifest.json (`attribution.values.Manifest`): enough to repeat the run and to know what its numbers mean."""
    import torch

    from attribution.values.manifest import FILENAME as MANIFEST_FILE
    from attribution.values.manifest import CorpusInfo, Manifest, Timings, TrainingInfo, ValSetInfo

    previous = Manifest.read(out) if (out / MANIFEST_FILE).exists() else None
    resumes = previous.resumed_from if previous is not None else []
    resuming = resumed_from is not None and status == "running"
    if resuming:
        resumes = [*resumes, resumed_from]
    # the first session's start is kept; each resumed session adds its own start to `resumed_at`
    before = previous.timings if previous is not None else Timings()
    now = Timings(**timings)
    merged = Timings(
        started=before.started if before.started is not None else now.started,
        finished=now.finished if now.finished is not None else before.finished,
        train_seconds=now.train_seconds if now.train_seconds is not None else before.train_seconds,
        tokens_per_s=now.tokens_per_s if now.tokens_per_s is not None else before.tokens_per_s,
        resumed_at=[*before.resumed_at, now.started] if resuming else before.resumed_at,
    )
    manifest = Manifest(
        status=status,
        config=cfg.to_json(),
        config_sources=sources or {},
        seed=cfg.seed,
        corpus=CorpusInfo(
            specs=cfg.corpus,
            fingerprint=data.fingerprint,
            n_docs_total=len(data.seqset.docs),
            n_docs_trained=len(data.doc_rows),
            n_sequences=len(data.train_seqs),
            excluded_ids=data.excluded,
            identical_to_validation=data.dropped_identical,
        ),
        val_sets={
            name: ValSetInfo(
                path=v.path, n_docs=len(v.docs), n_sequences=len(v.ids), per_example=v.per_example
            )
            for name, v in val.items()
        },
        training=TrainingInfo(
            total_steps=total,
            device=device,
            dtype=dtype,
            world_size=info.world,
            tokens_per_step=cfg.batch_size * cfg.seq_len,
            order=cfg.order,
            optimizer=cfg.optimizer,
            values="adam-aware" if cfg.adam_aware else ("sgd" if cfg.optimizer == "sgd" else "sgd-proxy"),
            clip="values are for the clipped step: scaled by min(1, clip/(||g||+1e-6))",
            weight_decay_credit="none (data-independent shrink)",
            threads=torch.get_num_threads(),
        ),
        values=store.describe() if store is not None else None,
        final_val_loss=final_val,
        indexes=_indexes(out),
        timings=merged,
        peak_rss_mb=peak_rss_mb(),
        versions=versions(),
        git_commit=git_commit(),
        resumed_from=resumes,
        # the replay chain's links with their content hashes (attribution.train.chain); claims replay from them
        extra={"replay": chain.read_index(out)} if cfg.keep_every else {},
    )
    manifest.write(out)
