"""Scores `<g_train_i, g_val_group>` per parameter with the planned strategy, summed in float64.

A `ValSide` is everything the training side is scored against for one validation set: weighted
validation captures (for ghost parameters) and materialized, optionally preconditioned, validation
gradients `G [groups, P0, P1]` (for project/materialize parameters). It is linear, so averaging two
sides (the trapezoid of second order) or preconditioning (AdamW) happens on the side, not on scores.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from .capture import Captured
from .ghost import ghost_scores
from .planner import KRON_DIM, Plan
from .rules import Use

TOKEN_CHUNK = 1 << 22  # elements per [tokens x P] intermediate of the project strategy


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) is scored in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass
class ValSide:
    """What training samples are scored against, for one validation set."""

    m: int
    per_example: bool
    ghost: list[tuple[Captured, float]] = field(default_factory=list)
    dense: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def groups(self) -> int:
        return self.m if self.per_example else 1

    def combine(self, other: ValSide, w_self: float, w_other: float) -> ValSide:
        """`w_self * self + w_other * other` (same validation set at two weight vectors)."""
        ghost = [(c, w * w_self) for c, w in self.ghost] + [(c, w * w_other) for c, w in other.ghost]
        dense = {k: w_self * g + w_other * other.dense[k] for k, g in self.dense.items()}
        return ValSide(self.m, self.per_example, ghost, dense)

    def precondition(self, pre: dict[int, torch.Tensor]) -> ValSide:
        """Elementwise preconditioner on the materialized gradients (ghost parameters cannot take one)."""
        if any(k in pre for cap, _ in self.ghost for k in cap.uses):
            raise ValueError("ghost-strategy parameters cannot be preconditioned; use 'project'")
        dense = {k: g * pre[k].reshape(g.shape[1:]).to(g.dtype) if k in pre else g for k, g in self.dense.items()}
        return ValSide(self.m, self.per_example, self.ghost, dense)


def materialize_use(u: Use, shape: tuple[int, int], per_sample: bool, dtype: torch.dtype,
                    out: torch.Tensor | None = None) -> torch.Tensor:
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
    g = torch.einsum("ntp,ntq->npq", row, col) if per_sample else (row.reshape(-1, p0).t() @ col.reshape(-1, p1)).unsqueeze(0)
    return g if out is None else out.add_(g)


def materialize(uses: list[Use], shape: tuple[int, int], per_sample: bool, dtype: torch.dtype) -> torch.Tensor:
    """Sum over all uses of a parameter (tied parameters add their modules' contributions).

    Dense uses first, so that index uses scatter into the dense result without another buffer.
    """
    ordered = sorted(uses, key=lambda u: bool(u.row_index and u.col is not None))
    out = materialize_use(ordered[0], shape, per_sample, dtype)
    for u in ordered[1:]:
        out = materialize_use(u, shape, per_sample, dtype, out=out)
    return out


def kron_uses(uses: list[Use], name: str, shape: tuple[int, int]) -> tuple[list[Use], tuple[int, int]]:
    """The uses with rows and columns multiplied by fixed Gaussian projections (seeded by the parameter name).

    `E[<R g, R h>] = <g, h>` for `R = R0 (x) R1` with N(0, 1/k) entries; a side of size <= KRON_DIM
    is left exact (identity).
    """
    p0, p1 = shape
    dtype = compute_dtype(uses[0].col if uses[0].col is not None else uses[0].row)
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
            row = (r0.t()[u.row] if r0 is not None else torch.nn.functional.one_hot(u.row, p0).to(dtype))
        else:
            row = u.row.to(dtype) @ r0.t() if r0 is not None else u.row.to(dtype)
        col = None if u.col is None else (u.col.to(dtype) @ r1.t() if r1 is not None else u.col.to(dtype))
        out.append(Use(row, col, False))
    return out, (p0 if r0 is None else KRON_DIM, p1 if r1 is None else KRON_DIM)


def build_val_side(cap: Captured, plan: Plan, shapes: dict[int, tuple[int, int]], per_example: bool) -> ValSide:
    """Materialize `G_val` for non-ghost parameters; keep the factors for ghost ones."""
    side = ValSide(cap.n, per_example)
    need_ghost = False
    for pid, uses in cap.uses.items():
        if plan.strategy(pid) == "ghost":
            need_ghost = True
            continue
        if plan.strategy(pid) == "kronecker":
            small, kshape = kron_uses(uses, plan.layers[pid].name, shapes[pid])
            side.dense[pid] = materialize(small, kshape, per_example, compute_dtype(small[0].row))
            continue
        side.dense[pid] = materialize(uses, shapes[pid], per_example, compute_dtype(uses[0].col if uses[0].col is not None else uses[0].row))
    if need_ghost:
        ghost_only = Captured(cap.n, {k: v for k, v in cap.uses.items() if plan.strategy(k) == "ghost"}, cap.losses)
        side.ghost.append((ghost_only, 1.0))
    return side


def _project(u: Use, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[n, groups]`: sum_t row_t . (G col_t) for every group's G `[groups, P0, P1]`."""
    n, t = u.row.shape[:2]
    groups, p0, p1 = g.shape
    if u.col is None:
        return u.row.to(dtype).sum(1) @ g[..., 0].t()
    col = u.col.to(dtype).reshape(n * t, p1)
    if u.row_index:  # gather G's rows at the token ids
        ids = u.row.reshape(-1)
        out = torch.einsum("gnq,nq->ng", g[:, ids, :], col) if groups > 1 else (g[0][ids] * col).sum(-1, keepdim=True)
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


def score(train: Captured, side: ValSide, plan: Plan, shapes: dict[int, tuple[int, int]]) -> torch.Tensor:
    """`[n_train, groups]` float64 inner products of each training sample's gradient with each group's."""
    out = torch.zeros(train.n, side.groups, dtype=torch.float64)
    for pid, uses in train.uses.items():
        strat = plan.strategy(pid)
        dtype = compute_dtype(uses[0].col if uses[0].col is not None else uses[0].row)
        if strat == "ghost":
            part = torch.zeros(train.n, side.m, dtype=dtype, device=uses[0].row.device)
            for cap, w in side.ghost:
                for u in uses:
                    for v in cap.uses.get(pid, []):
                        part += w * ghost_scores(u, v, dtype)
            if not side.per_example:
                part = part.sum(1, keepdim=True)
        else:
            g = side.dense.get(pid)
            if g is None:  # parameter had no validation gradient (unused by the validation forward)
                continue
            if strat == "kronecker":
                small, kshape = kron_uses(uses, plan.layers[pid].name, shapes[pid])
                part = torch.einsum("npq,gpq->ng", materialize(small, kshape, True, dtype), g.to(dtype))
            elif strat == "project":
                part = sum(_project(u, g, dtype) for u in uses)
            else:
                mat = materialize(uses, shapes[pid], True, dtype)
                part = torch.einsum("npq,gpq->ng", mat, g.to(dtype))
        out += part.double().cpu()
    return out


def sq_norms(cap: Captured, plan: Plan) -> torch.Tensor:
    """`[n]` squared per-sample gradient norms (ghost within each sample, tied cross terms included)."""
    from .ghost import self_sq_norms

    out = torch.zeros(cap.n, dtype=torch.float64)
    for uses in cap.uses.values():
        dtype = compute_dtype(uses[0].col if uses[0].col is not None else uses[0].row)
        out += self_sq_norms(uses, dtype).double().cpu()
    return out
