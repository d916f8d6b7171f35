"""The scoring strategies as a registry, like the layer rules: looked up by name, one module each.

A strategy says, for one parameter, how `<g_train_i, g_val_group>` is computed: what the validation
side keeps (`val_gradient`: a dense gradient `G [groups, P0', P1']`, or None to keep the captured
factors), how the training samples are scored against it (`score`), what that costs (`cost`, which
the planner compares), and whether an elementwise preconditioner (optimizer-aware values) applies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from attribution.errors import UserError

from ..rules import Use

if TYPE_CHECKING:
    from ..sides import ValSide


@dataclass(frozen=True)
class CostInputs:
    """What a cost estimate sees for one parameter: its canonical shape, its uses and the batch sizes."""

    shape: tuple[int, int]
    uses: list[Use]
    n: int
    train_tokens: int
    m: int
    val_tokens: int
    groups: int
    itemsize: int = 4

    @property
    def bias_like(self) -> bool:
        """No column factor: every strategy sums the rows over tokens first."""
        return self.uses[0].col is None

    @property
    def full(self) -> float:
        return float(self.shape[0] * self.shape[1])

    @property
    def token_sums(self) -> float:
        """Flops of a bias-like parameter: summing every use over tokens, then `n x m` dot products."""
        p0 = self.shape[0]
        return len(self.uses) * (self.train_tokens + self.val_tokens) * p0 + 2.0 * self.n * self.m * p0

    @property
    def grouped_token_sums(self) -> float:
        """`token_sums` plus dotting the `n` summed rows with each group's materialized gradient."""
        return self.token_sums + 2.0 * self.n * self.groups * self.shape[0]


@dataclass(frozen=True)
class Param:
    """The parameter being scored: identity (keys the validation side), name, canonical shape, compute dtype."""

    pid: int
    name: str
    shape: tuple[int, int]
    dtype: torch.dtype


CostFn = Callable[[CostInputs], tuple[float, float]]  # -> (flops, bytes held)
# (uses, param, per_example[, into]) -> G; with `into` (a `materialize.ByColumn`), the per-example
# gradients are added into its buffer by column and the buffer is returned
ValGradientFn = Callable[..., torch.Tensor]
ScoreFn = Callable[
    [list[Use], "ValSide", Param], "torch.Tensor | None"
]  # -> [n, groups], None: nothing to add


@dataclass(frozen=True)
class Strategy:
    """One way of scoring a parameter. The cost model picks among the exact ones; the others only when forced.

    `order` places the strategy in the plan's cost table and breaks ties between equal costs (lower first).
    """

    name: str
    exact: bool
    preconditionable: bool
    score: ScoreFn
    val_gradient: ValGradientFn | None = None  # None: the validation side keeps the factors (ghost products)
    cost: CostFn | None = None  # needed by exact strategies; approximate ones are never costed
    approximation: str = ""  # how an approximate strategy approximates, for the plan's reason
    label: str = ""  # column header in `str(plan)`, the name when empty
    order: int = 100

    @property
    def column(self) -> str:
        return self.label or self.name


_REGISTRY: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    """Add a strategy; a module under `attribution.engine.strategies` calls this when imported."""
    if strategy.name in _REGISTRY:
        raise ValueError(f"strategy {strategy.name!r} is already registered")
    if strategy.exact and strategy.cost is None:
        raise ValueError(
            f"exact strategy {strategy.name!r} needs a cost: the planner picks exact strategies by cost"
        )
    if not strategy.exact and not strategy.approximation:
        raise ValueError(f"approximate strategy {strategy.name!r} must say how it approximates")
    _REGISTRY[strategy.name] = strategy
    return strategy


def unregister_strategy(name: str) -> None:
    """Remove a registered strategy (tests register toy ones and take them out again)."""
    del _REGISTRY[name]


def registered() -> list[Strategy]:
    """Every strategy, in plan-table order."""
    return sorted(_REGISTRY.values(), key=lambda s: s.order)


def get_strategy(name: str, *, param: str | None = None) -> Strategy:
    """The strategy called `name`; an unknown name is a UserError that lists the known ones."""
    found = _REGISTRY.get(name)
    if found is None:
        where = f" for {param}" if param else ""
        raise UserError(
            f"unknown strategy {name!r}{where}; choose from {', '.join(s.name for s in registered())}"
        )
    return found


def dense_score(fn: Callable[[list[Use], torch.Tensor, Param], torch.Tensor]) -> ScoreFn:
    """A `score` for strategies with a dense validation gradient: `fn(uses, G, param)`, skipped without a G.

    A parameter has no G when the validation forward never used it.
    """

    def score(uses: list[Use], side: ValSide, param: Param) -> torch.Tensor | None:
        g = side.dense.get(param.pid)
        return None if g is None else fn(uses, g, param)

    return score
