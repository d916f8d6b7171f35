"""Exact gradient similarity at the run's kept checkpoints: TrackStar's recipe with no projection.

Why: an In-Run Shapley value answers "what did this document's update do to this text's loss, at the
step it was trained". A copyright reviewer mostly asks another question, "which document is this text
derived from", and for that a similarity of gradients at a few fixed weights ranks originals better:
TrackStar (Chang et al., 2024) uses Adam-normalized, unit-normalized gradients at a handful of
checkpoints, through random projections. A run's replay chain (`attribution.train.chain`) keeps
checkpoints *with their Adam state*, so the same similarity can be computed exactly, with every
parameter and no projection:

    u_s(x) = K_s^(power/2) * g_x(w_s)                     (elementwise; K_s = Adam's 1/(sqrt(v_hat)+eps))
    checkpoint_cosine(d, t) = mean over kept links s of <u_s(d), u_s(t)> / (|u_s(d)| |u_s(t)|)

`g_x` is the gradient of the summed per-sequence loss over x's sequences (the training sequences the
run trained a document on, every validation sequence of a text). `power=1` weighs coordinates as one Adam update
does (`<g_t, K g_d>`); `power=2` divides each side by `sqrt(v)` as TrackStar does. Runs trained with
SGD have `K = 1`: plain cosines. The step-0 link has no Adam state yet and takes the next link's `K`.

A text's score depends only on its own gradients and the documents', never on the other texts asked
about. The result is a column of per-example rows (`checkpoint_values.parquet` in the run directory),
which `attribution.values.RunValues` joins to `example_values` so that views can read it.

Cost: one gradient per document and text per kept link (a pass over the trained sequences per link,
no optimizer step), held dense: `texts x parameters` floats per link (`MAX_TEXT_BYTES` bounds it by
taking the texts in groups, each group another pass over the documents). It runs in one process, after
training (rank 0 under torchrun).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from attribution.errors import UserError
from attribution.values.results import CHECKPOINT_COLUMN as COLUMN
from attribution.values.rundir import CHECKPOINT_VALUES as TABLE

# the exponent of K each side takes by default: chosen on the tuning half of the hand-written cases over
# powers 0, 1, 2 (benchmarks/checkpoint_power.py; docs/benchmarks.md, "Session 11")
POWER = 1.0
MAX_TEXT_BYTES = 2 << 30  # the texts' dense gradients held at once: larger sets go in groups
# documents' dense gradients scored against the texts at once (room for two copies, for several powers):
# a small block keeps this pass under the training step's peak; the scoring reads the texts' rows once
# per block, at a rate `DOT_SLICE` keeps up with a few documents
DOC_BLOCK_BYTES = 1 << 27
# parameters per GEMM of that scoring, the slices summed in float64. Why: one float32 GEMM over millions
# of Adam-scaled coordinates (K up to 1e7) lost up to 2e-3 of a cosine against float64 on the demo's run;
# a slice's float32 error grows with its length, and slices of 16K summed in float64 (with `_unit`'s norm
# in float64) left 4e-6 on the demo's worst pair.
# With a few documents they also run 1.8-2x faster than one GEMM, which this machine's BLAS runs at
# 13-15 GFLOP/s there (docs/benchmarks.md, "Session 22")
DOT_SLICE = 1 << 14
SEQ_CHUNK: int | None = None  # sequences per forward/backward; None = the engine's `sequences_per_pass`


class Sequences:
    """Token sequences owned by items (documents or texts): ids/mask `[n_seq, T]`, owner `[n_seq]`."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, owner: np.ndarray, n_items: int):
        self.ids, self.mask = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int64)
        self.owner = np.asarray(owner, dtype=np.int64)
        self.n_items = int(n_items)
        order = np.argsort(self.owner, kind="stable")
        bounds = np.searchsorted(self.owner[order], np.arange(self.n_items + 1))
        self._rows = [order[bounds[i] : bounds[i + 1]] for i in range(self.n_items)]

    def rows(self, item: int) -> np.ndarray:
        return self._rows[item]

    def subset(self, items: Sequence[int]) -> Sequences:
        rows = [self.rows(i) for i in items]
        owner = np.concatenate([np.full(len(r), j) for j, r in enumerate(rows)]) if rows else np.zeros(0)
        take = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        return Sequences(self.ids[take], self.mask[take], owner, len(rows))


def gradients(model, task, seqs: Sequences, params: Mapping[int, tuple[str, object]]):
    """`[n_items, n_params]` on the model's device and in its dtype: each item's gradient of its summed
    per-sequence loss, flattened in `params` order (a zero row where the item has no label token).

    Why through the engine's capture: one forward/backward per chunk of many items' sequences, each
    parameter's per-item gradients added by item straight into their slice of the result (`ByColumn`,
    one GEMM per item and weight), where one backward per item ran the model's small GEMMs at a fraction
    of the machine's rate (docs/benchmarks.md, "Session 22"). The sum over an item's sequences is the same
    gradient, up to float rounding. A causal task's chunk is cut to its longest sequence (the trailing
    padding changes no loss or gradient)."""
    import torch

    from attribution.engine.capture import Capturer
    from attribution.engine.rules import canonical_shape
    from attribution.engine.scoring import factor_dtype
    from attribution.engine.strategies.materialize import ByColumn, add_by_column, column_runs
    from attribution.engine.valuer import eval_mode, sequences_per_pass

    first = next(iter(params.values()))[1]
    n_params = sum(p.numel() for _, p in params.values())
    out = torch.zeros(seqs.n_items, n_params, dtype=first.dtype, device=first.device)
    views, at = {}, 0
    for pid, (_, p) in params.items():  # each parameter's `[items, P0, P1]` slice of the rows
        views[pid] = out[:, at : at + p.numel()].view(seqs.n_items, *canonical_shape(p))
        at += p.numel()
    chunk = SEQ_CHUNK or sequences_per_pass(seqs.ids.shape[1], max(p.shape[0] for _, p in params.values()))
    order = np.concatenate([seqs.rows(i) for i in range(seqs.n_items)] or [np.zeros(0, dtype=np.int64)])
    causal = getattr(task, "causal", False)
    capturer = Capturer(model)
    try:
        for s in range(0, len(order), chunk):
            r = order[s : s + chunk]
            real = np.flatnonzero(seqs.mask[r].any(0))  # positions where some sequence has a token
            width = int(real[-1]) + 1 if causal and len(real) else seqs.ids.shape[1]
            ids = torch.from_numpy(seqs.ids[r, :width]).to(first.device)
            mask = torch.from_numpy(seqs.mask[r, :width]).to(first.device)
            with eval_mode(model), torch.enable_grad():
                cap = capturer.grads_only(lambda ids=ids, mask=mask: task.per_sequence_loss(model, ids, mask))
            items = torch.from_numpy(seqs.owner[r]).to(first.device)
            runs = column_runs(items)
            for pid, uses in cap.uses.items():
                into = ByColumn(items, lambda shape, dtype, pid=pid: views[pid], runs)
                add_by_column(uses, views[pid].shape[1:], factor_dtype(uses), into)
            del cap
    finally:
        capturer.remove()
    return out


def _dots(a, b):
    """`a @ b.T` in float64: each slice of `DOT_SLICE` columns one GEMM in the rows' dtype (see there)."""
    import torch

    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for lo in range(0, a.shape[1], DOT_SLICE):
        out += a[:, lo : lo + DOT_SLICE] @ b[:, lo : lo + DOT_SLICE].T
    return out


def _unit(x, *, in_place: bool = False):
    """Rows scaled to unit norm (zero rows stay zero); `in_place`: written into `x`."""
    import torch

    # summed in float64: torch's float32 norm of millions of Adam-scaled coordinates was off by 1e-4-1e-3;
    # slice by slice, so that no float64 copy of the rows is made (1.3 GB for the demo's texts)
    sq = torch.zeros(x.shape[0], 1, dtype=torch.float64, device=x.device)
    for lo in range(0, x.shape[1], DOT_SLICE):
        sq += (
            torch.linalg.vector_norm(x[:, lo : lo + DOT_SLICE], dim=1, keepdim=True, dtype=torch.float64) ** 2
        )
    norm = sq.sqrt_().clamp_min(torch.finfo(x.dtype).tiny).to(x.dtype)
    return x.div_(norm) if in_place else x / norm


def _side(g, scale, *, in_place: bool = False):
    """One side of the cosine: the gradients weighted by `K^(power/2)` (None: unweighted), unit rows.
    `in_place`: written into `g` (its last use), so a block of documents is held once, not three times."""
    if scale is not None:
        g = g.mul_(scale) if in_place else g * scale
    return _unit(g, in_place=in_place or scale is not None)


def cosines(
    model,
    task,
    load_links: Sequence[Callable[[], Mapping[int, object] | None]],
    texts: Sequences,
    docs: Sequences,
    *,
    powers: Sequence[float] = (POWER,),
    progress: bool = False,
    sink: Callable[[str, int, range, object], None] | None = None,
) -> np.ndarray:
    """`[len(powers), n_texts, n_docs]`: per power, the mean over links of the preconditioned cosine.

    Each entry of `load_links` loads one kept checkpoint into `model` and returns Adam's `K` there
    (param id -> param-shaped tensor), or None where the link has no Adam state: it then takes the next
    link's `K` (the step-0 link), or `K = 1` when no link has one (SGD). Several powers share one
    gradient pass. `sink("text" | "doc", link, items, rows)`, when given, sees every item's unit side
    at the first power once per link (`attribution.workflows.checkpoint_sketch` sketches them)."""
    import torch
    from tqdm import tqdm

    from attribution.engine.rules import trainable_params

    params = trainable_params(model)
    first = next(iter(params.values()))[1]
    row_bytes = first.element_size() * sum(p.numel() for _, p in params.values())
    group = max(1, int(MAX_TEXT_BYTES // (row_bytes * (1 + len(powers)))))
    block = max(1, int(DOC_BLOCK_BYTES // (row_bytes * 2)))
    passes = -(-texts.n_items // group)
    total = np.zeros((len(powers), texts.n_items, docs.n_items))
    bar = tqdm(
        total=len(load_links) * (texts.n_items + docs.n_items * passes),
        desc="checkpoint gradients",
        unit="grad",
        disable=not progress,
        file=sys.stderr,
    )
    for i, load in enumerate(load_links):
        k = load()
        if k is None:  # no Adam state here (step 0): the next link that has one lends its K
            k = next((kk for kk in (later() for later in load_links[i + 1 :]) if kk is not None), None)
            load()
        flat_k = None if k is None else torch.cat([k[pid].reshape(-1) for pid in params]).to(first)
        scales = [None if flat_k is None else flat_k.pow(p / 2) for p in powers]
        for start in range(0, texts.n_items, group):
            items = range(start, min(start + group, texts.n_items))
            g = gradients(model, task, texts.subset(items), params)
            units = [_side(g, sc, in_place=j == len(scales) - 1) for j, sc in enumerate(scales)]
            del g
            if sink is not None:
                sink("text", i, items, units[0])
            bar.update(len(items))
            for b in range(0, docs.n_items, block):
                cols = range(b, min(b + block, docs.n_items))
                d = gradients(model, task, docs.subset(cols), params)
                for j, u in enumerate(units):
                    side = _side(d, scales[j], in_place=j == len(units) - 1)
                    if sink is not None and j == 0 and start == 0:
                        sink("doc", i, cols, side)
                    total[j, start : items.stop, b : cols.stop] += _dots(u, side).cpu().numpy()
                bar.update(len(cols))
            del units  # before the next group's (or link's) gradients: never two groups held at once
    bar.close()
    return total / max(len(load_links), 1)


# ---------------------------------------------------------------------------------------------
# A run directory


def trained_sequences(train_seqs: np.ndarray, seed: int, taken: int) -> np.ndarray:
    """The sequences the run's loop trained on (its first `taken` stream positions), each once: a
    document's gradient is that of what it gave training, not of text the run never reached."""
    from attribution.train.loop import Sampler

    return np.unique(Sampler(train_seqs, seed).take(0, taken))


def for_run(
    run: str | Path,
    texts: Mapping | None = None,
    *,
    doc_ids: Collection[str] | None = None,
    powers: Sequence[float] = (POWER,),
    progress: bool = False,
    reference: bool = True,
    sink: Callable[[str, int, range, object], None] | None = None,
) -> pd.DataFrame:
    """`doc_id, val_set, val_id` and one `p<power>` column of checkpoint cosines per power (`write` keeps
    one), for every document of the run's value store and every text of `texts` (`{set name:
    ValData}`; default: the run's per-example validation sets) and of the run's reference set
    (`reference=False`: not). `doc_ids`: only these documents (a targeted claim). `sink`: see `cosines`;
    its items are the frame's texts in order, and the documents of the frame's `doc_id` order."""

    import torch

    from attribution.engine.optimizer import is_adam
    from attribution.engine.rules import trainable_params
    from attribution.engine.task import LanguageModelingTask
    from attribution.train import chain, loop
    from attribution.values.rundir import RunDir
    from attribution.workflows.claim_fast import _config, _has_adam_state, link_preconditioner, parent_data

    run = Path(run)
    cfg = _config(RunDir(run).manifest())
    links = chain.links(run)
    if not links:
        raise UserError(
            f"{run}: the run kept no replay chain, so there are no checkpoints to compare gradients at "
            "(train with --keep-every N)"
        )
    own, data = parent_data(run, cfg)
    texts = dict({n: v for n, v in own.items() if v.per_example} if texts is None else texts)
    device, dtype = loop.resolve_device(cfg)
    model = loop.build_model(cfg, device, "float64" if dtype == "float64" else "float32")
    optimizer = loop.build_optimizer(model, cfg)
    ref = loop.reference_set(data) if reference else None
    if ref is not None:
        texts[ref.name] = ref
    if not texts:
        raise UserError(f"{run}: no per-example texts to compare the documents with")

    seqs = trained_sequences(
        data.train_seqs, cfg.seed, cfg.total_steps(len(data.train_seqs)) * cfg.batch_size
    )
    doc_table = data.docs
    row = np.arange(len(doc_table))  # store row -> row of the documents scored (-1: not scored)
    if doc_ids is not None:
        keep = doc_table["doc_id"].astype(str).isin(set(map(str, doc_ids))).to_numpy()
        row = np.where(keep, np.cumsum(keep) - 1, -1)
        doc_table = doc_table[keep].reset_index(drop=True)
        seqs = seqs[row[data.store_row_of_seq[seqs]] >= 0]
    docs = Sequences(
        data.seqset.ids[seqs], data.seqset.mask[seqs], row[data.store_row_of_seq[seqs]], len(doc_table)
    )
    names = [(n, i) for n, v in texts.items() for i in v.example_ids]
    offsets = np.cumsum([0] + [len(v.docs) for v in texts.values()])
    text_seqs = Sequences(
        np.concatenate([v.ids for v in texts.values()]),
        np.concatenate([v.mask for v in texts.values()]),
        np.concatenate([v.seq_doc + o for v, o in zip(texts.values(), offsets, strict=False)]),
        len(names),
    )

    params = trainable_params(model)
    ones = None if is_adam(optimizer) else {pid: torch.ones_like(p) for pid, (_, p) in params.items()}

    def loader(link):
        def load():
            chain.load_link(link, model, optimizer, device=device)
            if ones is not None:  # SGD: plain cosines
                return ones
            return link_preconditioner(model, optimizer) if _has_adam_state(optimizer) else None

        return load

    scores = cosines(
        model,
        LanguageModelingTask(),
        [loader(lk) for lk in links],
        text_seqs,
        docs,
        powers=powers,
        progress=progress,
        sink=sink,
    )
    ids = doc_table["doc_id"].astype(str).to_numpy()
    return pd.DataFrame(
        {
            "doc_id": np.tile(ids, len(names)),
            "val_set": np.repeat([n for n, _ in names], len(ids)),
            "val_id": np.repeat([i for _, i in names], len(ids)),
            **{power_column(p): scores[j].reshape(-1) for j, p in enumerate(powers)},
        }
    )


def power_column(power: float) -> str:
    return f"p{power:g}"


def write(run: str | Path, frame: pd.DataFrame, *, power: float = POWER) -> Path:
    """Write `checkpoint_values.parquet` atomically: the keys and `checkpoint_cosine`, the cosines of
    `frame` at `power` (recorded in the file's metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from attribution.io import atomic_path

    path = Path(run) / TABLE
    frame = frame[["doc_id", "val_set", "val_id"]].assign(**{COLUMN: frame[power_column(power)]})
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"power": str(power).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path
