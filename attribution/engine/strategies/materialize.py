"""`materialize`: per-sample gradients `[n, P0, P1]` dotted with each group's validation gradient.

Exact, and cheap only for tiny parameters (biases, LayerNorms). The helpers here also serve the other
dense strategies: `project` and `kronecker` materialize the validation gradient the same way.
"""

from __future__ import annotations

import torch

from ..rules import Use
from .registry import CostInputs, Param, Strategy, dense_score, register_strategy


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


def materialized_val_gradient(uses: list[Use], param: Param, per_example: bool) -> torch.Tensor:
    """`G_val [groups, P0, P1]`: one gradient per validation example, or their sum."""
    return materialize(uses, param.shape, per_example, param.dtype)


def score_materialized(
    uses: list[Use], shape: tuple[int, int], g: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """`[n, groups]`: the per-sample gradients of `uses` (in `shape`) dotted with every group's `g`."""
    return torch.einsum("npq,gpq->ng", materialize(uses, shape, True, dtype), g.to(dtype))


def _cost(c: CostInputs) -> tuple[float, float]:
    if c.bias_like:
        return c.grouped_token_sums, float((c.n + c.groups) * c.shape[0] * c.itemsize)
    p1 = c.shape[1]
    nt, mt = c.train_tokens, c.val_tokens
    flops = 2.0 * c.n * c.groups * c.full
    for u in c.uses:
        flops += (nt + mt) * p1 if u.row_index else 2.0 * (nt + mt) * c.full
    return flops, float((c.n + c.groups) * c.full * c.itemsize)


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
