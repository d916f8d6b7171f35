"""`kronecker` (approximate, only when asked for): a Kronecker-factored Gaussian random projection
`R0 (x) R1` of the row and column factors (k = `KRON_DIM` per side), then materialize in the small space.

Unbiased, with JL-type error; the way to score hundreds of validation examples per parameter cheaply.
Not preconditionable: the elementwise preconditioner lives in the parameter's space, not the projected one.
"""

from __future__ import annotations

import zlib

import torch

from ..rules import Use
from .materialize import ByColumn, add_by_column, materialize, score_materialized
from .registry import Param, Strategy, dense_score, register_strategy

KRON_DIM = 64


def kron_uses(
    uses: list[Use], name: str, shape: tuple[int, int], dtype: torch.dtype
) -> tuple[list[Use], tuple[int, int]]:
    """The uses with rows and columns multiplied by fixed Gaussian projections (seeded by the parameter name).

    `E[<R g, R h>] = <g, h>` for `R = R0 (x) R1` with N(0, 1/k) entries; a side of size <= KRON_DIM
    is left exact (identity). The projected factors are in `dtype`.
    """
    p0, p1 = shape
    dev = uses[0].row.device
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))

    def mat(p: int) -> torch.Tensor | None:
        if p <= KRON_DIM:
            return None
        return (torch.randn(KRON_DIM, p, generator=gen, dtype=torch.float64) / KRON_DIM**0.5).to(dev, dtype)

    r0, r1 = mat(p0), mat(p1)
    out = []
    for u in uses:
        if u.row_index:
            row = r0.t()[u.row] if r0 is not None else torch.nn.functional.one_hot(u.row, p0).to(dtype)
        else:
            row = u.row.to(dtype) @ r0.t() if r0 is not None else u.row.to(dtype)
        col = None if u.col is None else (u.col.to(dtype) @ r1.t() if r1 is not None else u.col.to(dtype))
        out.append(Use(row, col, False))
    return out, (p0 if r0 is None else KRON_DIM, p1 if r1 is None else KRON_DIM)


def _val_gradient(
    uses: list[Use], param: Param, per_example: bool, into: ByColumn | None = None
) -> torch.Tensor:
    small, kshape = kron_uses(uses, param.name, param.shape, param.dtype)
    if into is not None:
        return add_by_column(small, kshape, param.dtype, into)
    return materialize(small, kshape, per_example, param.dtype)


def _score(uses: list[Use], g: torch.Tensor, param: Param) -> torch.Tensor:
    small, kshape = kron_uses(uses, param.name, param.shape, param.dtype)
    return score_materialized(small, kshape, g, param.dtype)


register_strategy(
    Strategy(
        name="kronecker",
        exact=False,
        preconditionable=False,
        order=40,
        approximation="random projection",
        val_gradient=_val_gradient,
        score=dense_score(_score),
    )
)
