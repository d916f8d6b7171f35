"""`ValSide`: what the training side of a step is scored against, for one validation set.

Its own module so that the strategies (which take a side) and the scorer (which builds one) both
import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .capture import Captured


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) is scored in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass
class ValSide:
    """What training samples are scored against, for one validation set.

    Per-example sides have one column per validation example. An example may span several sequences
    (a document longer than the context): `columns` maps each captured sequence to its example, and the
    dense gradients hold one row per example, the sum of its sequences' gradients. Why: the scores are
    linear, so a document's value is the same, and the side (the step's largest tensor for the tied head)
    shrinks from one row per sequence to one per document.
    """

    m: int  # validation sequences captured
    per_example: bool
    ghost: list[tuple[Captured, float]] = field(default_factory=list)
    dense: dict[int, torch.Tensor] = field(default_factory=dict)
    # [m] each captured sequence's column, in the order the validation pass took them (longest first,
    # `Valuer.pass_chunks`); None = every sequence its own, in the set's order
    columns: torch.Tensor | None = None
    n_columns: int = 0  # with `columns`: how many columns

    @property
    def groups(self) -> int:
        if not self.per_example:
            return 1
        return self.m if self.columns is None else self.n_columns

    def combine(self, other: ValSide, w_self: float, w_other: float) -> ValSide:
        """`w_self * self + w_other * other` (same validation set at two weight vectors)."""
        copy = replace(self, ghost=list(self.ghost), dense={k: g.clone() for k, g in self.dense.items()})
        return copy.combine_(other, w_self, w_other)

    def combine_(self, other: ValSide, w_self: float, w_other: float) -> ValSide:
        """`combine`, written into this side's own gradients (returns it). Why: at second order the
        "before" side is dead once combined, so the step holds two `[groups, P0, P1]` sides, not three."""
        self.ghost = [(c, w * w_self) for c, w in self.ghost] + [(c, w * w_other) for c, w in other.ghost]
        for k, g in self.dense.items():
            g.mul_(w_self).add_(other.dense[k], alpha=w_other)
        return self

    def precondition(self, pre: dict[int, torch.Tensor]) -> ValSide:
        """Elementwise preconditioner on the materialized gradients (ghost parameters cannot take one)."""
        return self._precondition(pre, in_place=False)

    def precondition_(self, pre: dict[int, torch.Tensor]) -> ValSide:
        """`precondition`, in place (returns this side): for a side nothing else holds."""
        return self._precondition(pre, in_place=True)

    def _precondition(self, pre: dict[int, torch.Tensor], in_place: bool) -> ValSide:
        if any(k in pre for cap, _ in self.ghost for k in cap.uses):
            raise ValueError("ghost-strategy parameters cannot be preconditioned; use 'project'")
        dense = {}
        for k, g in self.dense.items():
            factor = pre[k].reshape(g.shape[1:]).to(g.dtype) if k in pre else None
            dense[k] = g if factor is None else g.mul_(factor) if in_place else g * factor
        if in_place:
            return self
        return replace(self, dense=dense)
