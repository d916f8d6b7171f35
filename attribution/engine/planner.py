"""Per-parameter strategy choice by a FLOPs-and-bytes cost model, with an inspectable plan.

Strategies (all exact):
- `ghost`: pairwise token Gram products; per-validation-example scores for the price of one;
  cheap when train tokens x validation tokens is small next to the parameter size.
- `project`: materialize the validation gradient `G_val` per group once, then each training token
  costs one `row_t . (G_val col_t)`; cheapest for whole-set scores and long sequences. Required
  for optimizer-aware values (the preconditioner is elementwise on `G_val`).
- `materialize`: per-sample gradients `[n, P0, P1]`; only for tiny parameters (biases, LayerNorms).

And one approximate strategy, only when asked for (never picked by the cost model):
- `kronecker`: a Kronecker-factored Gaussian random projection `R0 (x) R1` of the row and column
  factors (k = `KRON_DIM` per side), then materialize in the small space. Unbiased, with JL-type
  error; the way to score hundreds of validation examples per parameter cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attribution.errors import UserError

from .rules import Use

STRATEGIES = ("ghost", "project", "materialize")  # exact; the cost model picks among these
APPROXIMATE = ("kronecker",)
KRON_DIM = 64
BYTE_WEIGHT = 8.0  # flop-equivalents per byte written: memory traffic is slow next to matmuls
MEMORY_BUDGET = 2 << 30  # bytes a strategy may hold for one parameter


@dataclass
class LayerPlan:
    """One parameter's strategy, the estimated cost of each option, and why."""

    name: str
    shape: tuple[int, int]
    n_uses: int
    strategy: str
    costs: dict[str, float]
    reason: str


@dataclass
class Plan:
    """The per-parameter plan; `str(plan)` prints one line per parameter."""

    layers: dict[int, LayerPlan] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def strategy(self, pid: int) -> str:
        return self.layers[pid].strategy

    def __str__(self) -> str:
        head = f"{'parameter':<40} {'shape':>14} {'uses':>4} {'strategy':>11}  {'ghost':>9} {'project':>9} {'mater.':>9}  reason"
        lines = [f"plan for {self.sizes}", head]
        for lp in self.layers.values():
            c = [f"{lp.costs.get(s, float('inf')):9.2e}" for s in STRATEGIES]
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
    shape: tuple[int, int], uses: list[Use], n: int, train_tokens: int, m: int, val_tokens: int, groups: int,
    *, itemsize: int = 4,
) -> dict[str, tuple[float, float]]:
    """(flops, bytes held) per strategy for one parameter; bytes drive the memory budget.

    Uses may differ (a tied embedding is an index use, the head a dense one): costs add up per use
    (project, materialize) or per pair of uses (ghost). Index rows cost a gather, not a matmul.
    """
    p0, p1 = shape
    nt, mt = train_tokens, val_tokens
    no_col = uses[0].col is None
    full = float(p0 * p1)
    out: dict[str, tuple[float, float]] = {}
    if no_col:  # bias-like: every strategy sums over tokens first
        flops = len(uses) * (nt + mt) * p0 + 2.0 * n * m * p0
        out["ghost"] = (flops, float((n + m) * p0 * itemsize))
        out["project"] = (flops + 2.0 * n * groups * p0, float(groups * p0 * itemsize))
        out["materialize"] = (flops + 2.0 * n * groups * p0, float((n + groups) * p0 * itemsize))
        return out
    ghost = 0.0
    for u in uses:
        for v in uses:
            row = 1.0 if (u.row_index or v.row_index) else 2.0 * p0
            ghost += nt * mt * (row + 2.0 * p1)
    out["ghost"] = (ghost, float(min(nt * mt, 1 << 24) * 2 * itemsize))
    proj = 0.0
    for u in uses:
        per_token = p1 if u.row_index else 2.0 * full
        proj += mt * per_token + nt * groups * per_token
    out["project"] = (proj, float(groups * full * itemsize))
    mat = 2.0 * n * groups * full
    for u in uses:
        mat += (nt + mt) * p1 if u.row_index else 2.0 * (nt + mt) * full
    out["materialize"] = (mat, float((n + groups) * full * itemsize))
    return out


def choose(
    name: str, shape: tuple[int, int], uses: list[Use], sizes: dict[str, int], *,
    optimizer_aware: bool, forced: str | None,
) -> LayerPlan:
    """Pick the cheapest allowed strategy (or the forced one) for one parameter."""
    est = estimate_costs(shape, uses, sizes["n"], sizes["train_tokens"], sizes["m"], sizes["val_tokens"], sizes["groups"])
    costs = {s: f + BYTE_WEIGHT * b for s, (f, b) in est.items()}
    if forced is not None:
        if forced not in STRATEGIES + APPROXIMATE:
            raise UserError(f"unknown strategy {forced!r} for {name}; choose from {', '.join(STRATEGIES + APPROXIMATE)}")
        if forced in ("ghost", "kronecker") and optimizer_aware:
            raise UserError(f"{name}: optimizer-aware values need 'project' or 'materialize' (elementwise preconditioner)")
        why = "forced by caller" + ("; approximate (random projection)" if forced in APPROXIMATE else "")
        return LayerPlan(name, shape, len(uses), forced, costs, why)
    allowed = [s for s in STRATEGIES if est[s][1] <= MEMORY_BUDGET and not (optimizer_aware and s == "ghost")]
    if not allowed:
        allowed = ["project"]
    best = min(allowed, key=lambda s: costs[s])
    why = f"lowest est. cost ({costs[best]:.2e})"
    if optimizer_aware:
        why += "; ghost excluded (optimizer-aware)"
    dropped = [s for s in STRATEGIES if est[s][1] > MEMORY_BUDGET]
    if dropped:
        why += f"; over memory budget: {','.join(dropped)}"
    if len(uses) > 1:
        why += f"; {len(uses)} uses (tied, cross terms included)"
    return LayerPlan(name, shape, len(uses), best, costs, why)


def resolve_forced(name: str, strategy: str | dict[str, str] | None) -> str | None:
    """The override for one parameter: a single name for all, or a dict keyed by parameter name/prefix."""
    if strategy is None or isinstance(strategy, str):
        return strategy
    best = None
    for key, val in strategy.items():
        if (name == key or name.startswith(key + ".") or key == "*") and (best is None or len(key) > len(best[0])):
            best = (key, val)
    return None if best is None else best[1]
