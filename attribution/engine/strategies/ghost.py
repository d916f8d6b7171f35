"""`ghost`: pairwise token Gram products (`attribution.engine.ghost`), never a gradient.

Exact; per-validation-example scores for the price of one, and cheap when train tokens x validation
tokens is small next to the parameter size. The validation side keeps its captured factors, so an
elementwise preconditioner cannot apply: not for optimizer-aware values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..ghost import ghost_scores
from ..rules import Use
from .registry import CostInputs, Param, Strategy, register_strategy

if TYPE_CHECKING:
    from ..sides import ValSide


def _score(uses: list[Use], side: ValSide, param: Param) -> torch.Tensor:
    """`[n, groups]`: every training use against every weighted validation use, tied cross terms included
    (scored per validation sequence, then summed into the side's columns)."""
    part = torch.zeros(uses[0].n, side.m, dtype=param.dtype, device=uses[0].row.device)
    for cap, w in side.ghost:
        for u in uses:
            for v in cap.uses.get(param.pid, []):
                part += w * ghost_scores(u, v, param.dtype)
    if not side.per_example:
        return part.sum(1, keepdim=True)
    if side.columns is None:
        return part
    out = part.new_zeros(part.shape[0], side.groups)
    return out.index_add_(1, side.columns.to(part.device), part)


def _cost(c: CostInputs) -> tuple[float, float]:
    if c.bias_like:
        return c.token_sums, float((c.n + c.m) * c.shape[0] * c.itemsize)
    p0, p1 = c.shape
    flops = 0.0
    for u in c.uses:
        for v in c.uses:
            row = 1.0 if (u.row_index or v.row_index) else 2.0 * p0
            flops += c.train_tokens * c.val_tokens * (row + 2.0 * p1)
    return flops, float(min(c.train_tokens * c.val_tokens, 1 << 24) * 2 * c.itemsize)


register_strategy(
    Strategy(name="ghost", exact=True, preconditionable=False, order=10, cost=_cost, score=_score)
)
