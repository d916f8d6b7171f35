"""`materialize`: per-sample gradients `[n, P0, P1]` dotted with each group's validation gradient.

Exact, and cheap only for tiny parameters (biases, LayerNorms). The helpers here also serve the other
dense strategies: `project` and `kronecker` materialize the validation gradient the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..rules import Use
from .registry import CostInputs, Param, Strategy, dense_score, register_strategy


@dataclass(frozen=True)
class ByColumn:
    """Per-sample gradients summed into columns: sample `i`'s gradient is added into `out[index[i]]`.

    Why: a per-example validation text spans several sequences and needs one gradient, not one per
    sequence. Each run of consecutive samples in one column is then a single GEMM over all their tokens,
    added straight into the side's buffer, where per-sequence gradients cost one GEMM each with an inner
    dimension of one sequence's tokens (64 at the CPU presets, where this machine's BLAS runs at about
    60% of its rate) and a scatter of `[sequences, P0, P1]` into the columns (docs/benchmarks.md,
    "Session 21"). `buffer(shape, dtype)` returns the `[columns, *shape]` sums to add into: the caller
    owns them, so several chunks of one set add into the same buffer.
    """

    index: torch.Tensor  # [n] int64, each sample's column
    buffer: Callable[[tuple[int, int], torch.dtype], torch.Tensor]
    runs: list[tuple[int, int, int]]  # column_runs(index), read once per chunk (a GPU syncs to read it)


def column_runs(index: torch.Tensor) -> list[tuple[int, int, int]]:
    """`(column, first, end)` for each run of consecutive samples that share a column."""
    cols = index.tolist()
    starts = [i for i in range(len(cols)) if i == 0 or cols[i] != cols[i - 1]]
    return [(cols[a], a, b) for a, b in zip(starts, [*starts[1:], len(cols)], strict=True)]


def add_by_column(
    uses: list[Use], shape: tuple[int, int], dtype: torch.dtype, into: ByColumn
) -> torch.Tensor:
    """Every use's per-sample gradients added into `into`'s buffer by column; returns the buffer."""
    p0, p1 = shape
    out = into.buffer(shape, dtype)
    for u in uses:
        if u.col is None:  # a 1-D parameter: its rows are per-sample gradients already
            out.index_add_(0, into.index, u.row.to(dtype).sum(1).unsqueeze(-1))
        elif u.row_index:  # an embedding: each run's tokens scattered into its column's rows
            col = u.col.to(dtype)
            for c, a, b in into.runs:  # by column: `out` may be a strided view (one column per row of it)
                out[c].index_add_(0, u.row[a:b].reshape(-1), col[a:b].reshape(-1, p1))
        else:
            row, col = u.row.to(dtype), u.col.to(dtype)
            for c, a, b in into.runs:
                out[c].addmm_(row[a:b].reshape(-1, p0).t(), col[a:b].reshape(-1, p1))
    return out


def materialize_use(
    u: Use, shape: tuple[int, int], per_sample: bool, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`[n, P0, P1]` per-sample gradients of one use (or `[1, P0, P1]` summed over samples).

    With `out`, an embedding (index) use is scattered into it in place, so a tied parameter's two
    uses share one `[n, V, d]` buffer instead of allocating, zero-filling and adding a second.
    """
    p0, p1 = shape
    n = u.n
    if u.col is None:
        g = u.row.to(dtype).sum(1).unsqueeze(-1)
        g = g if per_sample else g.sum(0, keepdim=True)
        return g if out is None else out.add_(g)
    col = u.col.to(dtype)
    if u.row_index:
        rows = u.row
        if per_sample:
            rows = rows + torch.arange(n, device=rows.device).unsqueeze(1) * p0
        if out is None:
            out = torch.zeros((n if per_sample else 1), p0, p1, dtype=dtype, device=col.device)
        out.view(-1, p1).index_add_(0, rows.reshape(-1), col.reshape(-1, p1))
        return out
    row = u.row.to(dtype)
    g = (
        torch.einsum("ntp,ntq->npq", row, col)
        if per_sample
        else (row.reshape(-1, p0).t() @ col.reshape(-1, p1)).unsqueeze(0)
    )
    return g if out is None else out.add_(g)


def materialize(
    uses: list[Use], shape: tuple[int, int], per_sample: bool, dtype: torch.dtype
) -> torch.Tensor:
    """Sum over all uses of a parameter (tied parameters add their modules' contributions).

    Dense uses first, so that index uses scatter into the dense result without another buffer.
    """
    ordered = sorted(uses, key=lambda u: bool(u.row_index and u.col is not None))
    out = materialize_use(ordered[0], shape, per_sample, dtype)
    for u in ordered[1:]:
        out = materialize_use(u, shape, per_sample, dtype, out=out)
    return out


def materialized_val_gradient(
    uses: list[Use], param: Param, per_example: bool, into: ByColumn | None = None
) -> torch.Tensor:
    """`G_val [groups, P0, P1]`: one gradient per validation example, or their sum; with `into`, the
    per-example gradients added into its buffer by column (and the buffer returned)."""
    if into is not None:
        return add_by_column(uses, param.shape, param.dtype, into)
    return materialize(uses, param.shape, per_example, param.dtype)


SCORE_BLOCK_BYTES = 1 << 26  # per-sample training gradients materialized at once: 64 MiB


def score_block(n: int, shape: tuple[int, int], itemsize: int) -> int:
    """Rows of the parameter (`P0`) whose `n` per-sample gradients are materialized at once when scoring:
    as many as fit in `SCORE_BLOCK_BYTES`, at least one. Why: for the tied head all of `[n, 50257, d]` at
    once is the step's largest transient (206 MB at the demo's shape, 2.5 GB at GPT-2 small's). Blocks of
    rows, not of samples, so that every validation gradient entry is still read once."""
    return max(1, min(shape[0], SCORE_BLOCK_BYTES // max(1, n * shape[1] * itemsize)))


def _param_rows(u: Use, lo: int, hi: int) -> Use:
    """The use's contribution to parameter rows `lo:hi` only (as a parameter of `hi - lo` rows)."""
    if not u.row_index:
        return Use(u.row[..., lo:hi], u.col, False)
    inside = (u.row >= lo) & (u.row < hi)  # embedding tokens of other rows add nothing here
    col = None if u.col is None else u.col * inside.unsqueeze(-1).to(u.col.dtype)
    return Use(torch.where(inside, u.row - lo, 0), col, True)


def score_materialized(
    uses: list[Use], shape: tuple[int, int], g: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """`[n, groups]`: the per-sample gradients of `uses` (in `shape`) dotted with every group's `g`,
    materialized `score_block` parameter rows at a time."""
    g = g.to(dtype)
    p0, p1 = shape
    rows = score_block(uses[0].n, shape, torch.finfo(dtype).bits // 8)
    if rows >= p0:
        return torch.einsum("npq,gpq->ng", materialize(uses, shape, True, dtype), g)
    out = None
    for lo in range(0, p0, rows):
        hi = min(lo + rows, p0)
        block = materialize([_param_rows(u, lo, hi) for u in uses], (hi - lo, p1), True, dtype)
        part = torch.einsum("npq,gpq->ng", block, g[:, lo:hi])
        out = part if out is None else out.add_(part)
    return out


def _cost(c: CostInputs) -> tuple[float, float]:
    if c.bias_like:
        return c.grouped_token_sums, float((c.n + c.groups) * c.shape[0] * c.itemsize)
    p1 = c.shape[1]
    nt, mt = c.train_tokens, c.val_tokens
    flops = 2.0 * c.n * c.groups * c.full
    for u in c.uses:
        flops += (nt + mt) * p1 if u.row_index else 2.0 * (nt + mt) * c.full
    return flops, float(
        (c.n * score_block(c.n, c.shape, c.itemsize) * c.shape[1] + c.groups * c.full) * c.itemsize
    )


register_strategy(
    Strategy(
        name="materialize",
        exact=True,
        preconditionable=True,
        label="mater.",
        order=30,
        cost=_cost,
        val_gradient=materialized_val_gradient,
        score=dense_score(lambda uses, g, param: score_materialized(uses, param.shape, g, param.dtype)),
    )
)
