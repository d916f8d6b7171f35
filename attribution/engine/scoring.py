"""Scores `<g_train_i, g_val_group>` per parameter with the planned strategy, summed in float64.

A `ValSide` is everything the training side is scored against for one validation set: weighted
validation captures (for strategies that keep the factors, ghost) and materialized, optionally
preconditioned, validation gradients `G [groups, P0, P1]` (for the dense strategies). It is linear, so
averaging two sides (the trapezoid of second order) or preconditioning (AdamW) happens on the side, not
on scores. Each parameter's strategy is looked up by name in `attribution.engine.strategies`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .capture import Captured
from .ghost import self_sq_norms
from .planner import Plan
from .rules import Use
from .sides import ValSide, compute_dtype  # noqa: F401  (compute_dtype re-exported: the valuer uses it)
from .strategies import Param, get_strategy
from .strategies.materialize import ByColumn, column_runs
from .strategies.materialize import (
    materialize as materialize,  # re-exported: the valuer sums ghost sides with it
)


def factor_dtype(uses: list[Use]) -> torch.dtype:
    """The dtype a parameter's uses are scored in (the column factor's; the row's when there is none)."""
    return compute_dtype(uses[0].col if uses[0].col is not None else uses[0].row)


def _param(pid: int, uses: list[Use], plan: Plan, shapes: dict[int, tuple[int, int]]) -> Param:
    return Param(pid, plan.layers[pid].name, shapes[pid], factor_dtype(uses))


def build_val_side(
    cap: Captured,
    plan: Plan,
    shapes: dict[int, tuple[int, int]],
    per_example: bool,
    columns: torch.Tensor | None = None,
    buffer: Callable[[int, tuple[int, int], torch.dtype], torch.Tensor] | None = None,
) -> ValSide:
    """Each strategy's validation gradient for its parameters; the factors for those that keep them (ghost).

    With `columns` (`[n]`, each sequence's example) and `buffer(pid, shape, dtype)` (the caller's
    `[examples, *shape]` sums), per-example gradients are added into those buffers by example, and
    `dense` holds the buffers (see `materialize.ByColumn`).
    """
    side = ValSide(cap.n, per_example)
    runs = column_runs(columns) if columns is not None and buffer is not None else []
    keep_factors = []
    for pid, uses in cap.uses.items():
        val_gradient = get_strategy(plan.strategy(pid)).val_gradient
        if val_gradient is None:
            keep_factors.append(pid)
            continue
        param = _param(pid, uses, plan, shapes)
        if columns is not None and buffer is not None:
            into = ByColumn(columns, functools.partial(buffer, pid), runs)
            side.dense[pid] = val_gradient(uses, param, per_example, into)
        else:
            side.dense[pid] = val_gradient(uses, param, per_example)
    if keep_factors:
        side.ghost.append((Captured(cap.n, {k: cap.uses[k] for k in keep_factors}, cap.losses), 1.0))
    return side


def score(train: Captured, side: ValSide, plan: Plan, shapes: dict[int, tuple[int, int]]) -> torch.Tensor:
    """`[n_train, groups]` float64 inner products of each training sample's gradient with each group's."""
    return score_sets(train, {"": side}, {"": plan}, shapes)[""]


def score_sets(
    train: Captured, sides: dict[str, ValSide], plans: dict[str, Plan], shapes: dict[int, tuple[int, int]]
) -> dict[str, torch.Tensor]:
    """`score` for several validation sets at once: `{name: [n_train, groups]}`, the same numbers.

    Why: a dense strategy builds its training side inside `score` (for `materialize`, every sample's
    `[P0, P1]` gradient; for the tied 50257-row head that is most of the scoring). Dense scores are
    linear in `G` and independent column by column, so the sets planned alike for a parameter have their
    `G [groups, P0, P1]` stacked along the group axis and are scored in one call: the training side is
    built once per step, not once per set. Ghost parameters (no `G`) are scored set by set.
    """
    # summed on the factors' device and moved to the host once: a copy per parameter would synchronize a
    # GPU 148 times a step for GPT-2 (float64 sums in the same order: the same numbers on the CPU)
    device = _device(train)
    out = {
        name: torch.zeros(train.n, side.groups, dtype=torch.float64, device=device)
        for name, side in sides.items()
    }

    def add(names: list[str], part: torch.Tensor | None) -> None:
        if part is None:  # the parameter had no validation gradient (unused by the validation forward)
            return
        for name, cols in zip(
            names, part.to(device, torch.float64).split([sides[n].groups for n in names], 1), strict=True
        ):
            out[name] += cols

    for pid, uses in train.uses.items():
        planned: dict[str, list[str]] = {}
        for name in sides:
            planned.setdefault(plans[name].strategy(pid), []).append(name)
        for strategy_name, names in planned.items():
            strategy = get_strategy(strategy_name)
            param = _param(pid, uses, plans[names[0]], shapes)
            stack = [n for n in names if pid in sides[n].dense] if strategy.val_gradient is not None else []
            if len(stack) > 1:
                g = torch.cat([sides[n].dense[pid] for n in stack])
                add(stack, strategy.score(uses, ValSide(len(g), True, dense={pid: g}), param))
                del g
            for name in names if len(stack) < 2 else [n for n in names if n not in stack]:
                add([name], strategy.score(uses, sides[name], param))
    return {name: scores.cpu() for name, scores in out.items()}


def _device(cap: Captured) -> torch.device:
    for uses in cap.uses.values():
        return uses[0].row.device
    return torch.device("cpu")


def sq_norms(cap: Captured, plan: Plan) -> torch.Tensor:
    """`[n]` squared per-sample gradient norms (ghost within each sample, tied cross terms included)."""
    out = torch.zeros(cap.n, dtype=torch.float64, device=_device(cap))
    for uses in cap.uses.values():
        out += self_sq_norms(uses, factor_dtype(uses)).to(out.device, torch.float64)
    return out.cpu()  # once: a copy per parameter would synchronize a GPU at each
