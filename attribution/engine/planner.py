"""Per-parameter strategy choice by a FLOPs-and-bytes cost model, with an inspectable plan.

The strategies live in `attribution.engine.strategies`, one module each, looked up by name: the cost
model picks the cheapest exact one within the memory budget (only preconditionable ones for
optimizer-aware values); an approximate one (`kronecker`) is used only when the caller forces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attribution.errors import UserError

from .rules import Use
from .strategies import CostInputs, Strategy, get_strategy, registered

BYTE_WEIGHT = 8.0  # flop-equivalents per byte written: memory traffic is slow next to matmuls
MEMORY_BUDGET = 2 << 30  # bytes a strategy may hold for one parameter


def exact_strategies() -> list[Strategy]:
    """The strategies the cost model chooses among (and the plan's cost columns), in order."""
    return [s for s in registered() if s.exact]


@dataclass
class LayerPlan:
    """One parameter's strategy, the estimated cost of each option, and why."""

    name: str
    shape: tuple[int, int]
    n_uses: int
    strategy: str
    costs: dict[str, float]
    reason: str
    # per use: (row is an index, has a column factor); what the memory model needs to size the captures
    use_kinds: tuple[tuple[bool, bool], ...] = ()


@dataclass
class Plan:
    """The per-parameter plan; `str(plan)` prints one line per parameter."""

    layers: dict[int, LayerPlan] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def strategy(self, pid: int) -> str:
        return self.layers[pid].strategy

    def __str__(self) -> str:
        columns = exact_strategies()
        head = (
            f"{'parameter':<40} {'shape':>14} {'uses':>4} {'strategy':>11}  "
            f"{' '.join(f'{s.column:>9}' for s in columns)}  reason"
        )
        lines = [f"plan for {self.sizes}", head]
        for lp in self.layers.values():
            c = [f"{lp.costs.get(s.name, float('inf')):9.2e}" for s in columns]
            lines.append(
                f"{lp.name:<40} {str(lp.shape):>14} {lp.n_uses:>4} {lp.strategy:>11}  {' '.join(c)}  {lp.reason}"
            )
        return "\n".join(lines)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for lp in self.layers.values():
            out[lp.strategy] = out.get(lp.strategy, 0) + 1
        return out


def estimate_costs(
    shape: tuple[int, int],
    uses: list[Use],
    n: int,
    train_tokens: int,
    m: int,
    val_tokens: int,
    groups: int,
    *,
    itemsize: int = 4,
) -> dict[str, tuple[float, float]]:
    """(flops, bytes held) per costed strategy for one parameter; bytes drive the memory budget.

    Uses may differ (a tied embedding is an index use, the head a dense one): costs add up per use
    (project, materialize) or per pair of uses (ghost). Index rows cost a gather, not a matmul.
    """
    inputs = CostInputs(shape, uses, n, train_tokens, m, val_tokens, groups, itemsize)
    return {s.name: s.cost(inputs) for s in registered() if s.cost is not None}


def choose(
    name: str,
    shape: tuple[int, int],
    uses: list[Use],
    sizes: dict[str, int],
    *,
    optimizer_aware: bool,
    forced: str | None,
) -> LayerPlan:
    """Pick the cheapest allowed strategy (or the forced one) for one parameter."""
    est = estimate_costs(
        shape, uses, sizes["n"], sizes["train_tokens"], sizes["m"], sizes["val_tokens"], sizes["groups"]
    )
    costs = {s: f + BYTE_WEIGHT * b for s, (f, b) in est.items()}
    kinds = tuple((u.row_index, u.col is not None) for u in uses)
    if forced is not None:
        strategy = get_strategy(forced, param=name)
        if optimizer_aware and not strategy.preconditionable:
            usable = " or ".join(repr(s.name) for s in registered() if s.preconditionable)
            raise UserError(f"{name}: optimizer-aware values need {usable} (elementwise preconditioner)")
        why = "forced by caller" + ("" if strategy.exact else f"; approximate ({strategy.approximation})")
        return LayerPlan(name, shape, len(uses), forced, costs, why, kinds)
    exact = exact_strategies()
    usable = [s.name for s in exact if s.preconditionable or not optimizer_aware]
    allowed = [s for s in usable if est[s][1] <= MEMORY_BUDGET]
    if not allowed:  # nothing fits the budget: the one that holds the least
        allowed = [min(usable, key=lambda s: est[s][1])]
    best = min(allowed, key=lambda s: costs[s])
    why = f"lowest est. cost ({costs[best]:.2e})"
    excluded = [s.name for s in exact if not s.preconditionable]
    if optimizer_aware and excluded:
        why += f"; {','.join(excluded)} excluded (optimizer-aware)"
    dropped = [s.name for s in exact if est[s.name][1] > MEMORY_BUDGET]
    if dropped:
        why += f"; over memory budget: {','.join(dropped)}"
    if len(uses) > 1:
        why += f"; {len(uses)} uses (tied, cross terms included)"
    return LayerPlan(name, shape, len(uses), best, costs, why, kinds)


def resolve_forced(name: str, strategy: str | dict[str, str] | None) -> str | None:
    """The override for one parameter: a single name for all, or a dict keyed by parameter name/prefix."""
    if strategy is None or isinstance(strategy, str):
        return strategy
    best = None
    for key, val in strategy.items():
        if (name == key or name.startswith(key + ".") or key == "*") and (
            best is None or len(key) > len(best[0])
        ):
            best = (key, val)
    return None if best is None else best[1]
