"""`project`: materialize the validation gradient `G_val` per group once, then each training token
costs one `row_t . (G_val col_t)`.

Exact; the cheapest for whole-set scores and long sequences, and preconditionable (optimizer-aware
values apply the elementwise preconditioner to `G_val`).
"""

from __future__ import annotations

import torch

from ..rules import Use
from .materialize import materialized_val_gradient
from .registry import CostInputs, Param, Strategy, dense_score, register_strategy

TOKEN_CHUNK = 1 << 22  # elements per [tokens x P] intermediate


def project_use(u: Use, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[n, groups]`: sum_t row_t . (G col_t) for every group's G `[groups, P0, P1]`."""
    n, t = u.row.shape[:2]
    groups, p0, p1 = g.shape
    if u.col is None:
        return u.row.to(dtype).sum(1) @ g[..., 0].t()
    col = u.col.to(dtype).reshape(n * t, p1)
    if u.row_index:  # gather G's rows at the token ids
        ids = u.row.reshape(-1)
        out = (
            torch.einsum("gnq,nq->ng", g[:, ids, :], col)
            if groups > 1
            else (g[0][ids] * col).sum(-1, keepdim=True)
        )
        return out.view(n, t, groups).sum(1)
    row = u.row.to(dtype).reshape(n * t, p0)
    out = torch.empty(n * t, groups, dtype=dtype, device=row.device)
    chunk = max(1, TOKEN_CHUNK // max(p0, p1))
    for j in range(groups):
        gj = g[j]
        for s in range(0, n * t, chunk):
            if p1 <= p0:
                out[s : s + chunk, j] = ((row[s : s + chunk] @ gj) * col[s : s + chunk]).sum(-1)
            else:
                out[s : s + chunk, j] = ((col[s : s + chunk] @ gj.t()) * row[s : s + chunk]).sum(-1)
    return out.view(n, t, groups).sum(1)


def _score(uses: list[Use], g: torch.Tensor, param: Param) -> torch.Tensor:
    return sum(project_use(u, g, param.dtype) for u in uses)


def _cost(c: CostInputs) -> tuple[float, float]:
    if c.bias_like:
        return c.grouped_token_sums, float(c.groups * c.shape[0] * c.itemsize)
    flops = 0.0
    for u in c.uses:
        per_token = c.shape[1] if u.row_index else 2.0 * c.full
        flops += c.val_tokens * per_token + c.train_tokens * c.groups * per_token
    return flops, float(c.groups * c.full * c.itemsize)


register_strategy(
    Strategy(
        name="project",
        exact=True,
        preconditionable=True,
        order=20,
        cost=_cost,
        val_gradient=materialized_val_gradient,
        score=dense_score(_score),
    )
)
