"""What a valued step holds, in bytes, predicted from its plans: the memory side of the cost model.

The planner's `estimate_costs` bounds what one parameter's scoring holds for a moment; this module adds
up what lives across the step: the training captures (each module's input activation and output
gradient, `[n, T, P]`; a 1-D parameter's row summed over tokens, `[n, 1, P]`), each validation
set's side (kept factors for ghost parameters, `G [groups, P0, P1]` for the dense ones), the score
matrices, the AdamW preconditioner (one float per parameter) and, at second order, the "before" side
held while the "after" side is built (the trapezoid and the preconditioner are applied in place, so
there is no third copy). Not modelled: autograd's own activations during the forward passes (plain
training holds them too; the validation passes run in chunks of `VAL_CHUNK_BYTES`) and allocator slack.

`held_bytes` measures the same terms on live tensors, so tests check the model against the Valuer.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .planner import LayerPlan, Plan, estimate_costs
from .rules import Use
from .strategies import get_strategy
from .strategies.kronecker import KRON_DIM

INDEX_ITEMSIZE = 8  # token ids are int64


@dataclass(frozen=True)
class MemoryTerm:
    """One thing the step holds: what it is, for which validation set (or layer), and its size."""

    what: str
    where: str
    bytes: int


@dataclass
class MemoryModel:
    """The terms of a valued step's memory; `str()` is a Markdown table with the total."""

    terms: list[MemoryTerm] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    def by_what(self) -> dict[str, int]:
        """Bytes per kind of term (every layer's captures together, every set's sides together)."""
        out: dict[str, int] = {}
        for t in self.terms:
            out[t.what] = out.get(t.what, 0) + t.bytes
        return out

    def get(self, what: str, where: str | None = None) -> int:
        return sum(t.bytes for t in self.terms if t.what == what and (where is None or t.where == where))

    def __str__(self) -> str:
        rows = ["| held | for | bytes | MiB |", "| --- | --- | ---: | ---: |"]
        summed: dict[tuple[str, str], int] = {}
        for t in self.terms:  # train captures per layer are summed into one row here
            key = (t.what, "all layers" if t.what == TRAIN else t.where)
            summed[key] = summed.get(key, 0) + t.bytes
        for (what, where), b in summed.items():
            rows.append(f"| {what} | {where} | {b:,} | {b / 2**20:.2f} |")
        rows.append(f"| **total** | | {self.total:,} | {self.total / 2**20:.2f} |")
        return "\n".join(rows)


TRAIN = "train captures"
SIDE = "validation side"
SCORES = "scores"
NORMS = "gradient norms"
PRE = "preconditioner"
BEFORE = "order-2 pending side"
TRANSIENT = "scoring transient (largest parameter)"


def _kinds(lp: LayerPlan) -> tuple[tuple[bool, bool], ...]:
    """Per use (index row, has column); plans made without uses are taken as dense uses."""
    return lp.use_kinds or ((False, lp.shape[1] > 1),) * lp.n_uses


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _layer(name: str) -> str:
    """`transformer.h.3.mlp.c_fc.weight` -> `transformer.h.3`; outside a block, the module."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return _module(name)


def factor_bytes(
    layers: Iterable[LayerPlan], samples: int, tokens: int, itemsize: int, *, unscaled: bool = False
) -> dict[str, int]:
    """Captured factor bytes per parameter for a batch of `samples` sequences, `tokens` tokens (n x T) in
    all, kept for `layers`.

    A bias-like use's row is summed over tokens when captured (`rules.token_sum`): `samples x P0` floats,
    in float32 at least. `unscaled`: the capture's gradients were not rescaled (validation passes, a
    training batch of one), so embeddings whose outputs are summed (GPT-2's token and position embeddings)
    share one output gradient: index uses' columns of one width count once.
    """
    index_cols: set[int] = set()
    out: dict[str, int] = {}
    for lp in layers:
        p0, p1 = lp.shape
        total = 0
        for index, col in _kinds(lp):
            if not col and not index:
                total += samples * p0 * max(itemsize, 4)
                continue
            total += tokens * (INDEX_ITEMSIZE if index else p0 * itemsize)
            if col and not (unscaled and index and p1 in index_cols):
                total += tokens * p1 * itemsize
            if unscaled and index and col:
                index_cols.add(p1)
        out[lp.name] = total
    return out


def _dense_shape(lp: LayerPlan) -> tuple[int, int]:
    """The materialized validation gradient's shape per group (`kronecker` projects each side to KRON_DIM)."""
    if lp.strategy == "kronecker":
        return min(lp.shape[0], KRON_DIM), min(lp.shape[1], KRON_DIM)
    return lp.shape


def side_bytes(plan: Plan, itemsize: int) -> tuple[int, int]:
    """(kept factor bytes, dense `G` bytes) of one validation set's side under `plan`."""
    ghost = [lp for lp in plan.layers.values() if get_strategy(lp.strategy).val_gradient is None]
    kept = sum(
        factor_bytes(ghost, plan.sizes["m"], plan.sizes["val_tokens"], itemsize, unscaled=True).values()
    )
    g_item = 8 if itemsize == 8 else 4  # scored in fp32 unless the model is float64
    dense = 0
    for lp in plan.layers.values():
        if get_strategy(lp.strategy).val_gradient is not None:
            p0, p1 = _dense_shape(lp)
            dense += plan.sizes["groups"] * p0 * p1 * g_item
    return kept, dense


def _stub_uses(lp: LayerPlan) -> list[Use]:
    """Shapeless uses with the plan's kinds: all `estimate_costs` reads of a use."""
    empty = torch.empty(0)
    return [Use(empty, empty if col else None, index) for index, col in _kinds(lp)]


def _strategy_bytes(lp: LayerPlan, sizes: Mapping[str, int], groups: int, itemsize: int = 4) -> int:
    est = estimate_costs(
        lp.shape,
        _stub_uses(lp),
        sizes["n"],
        sizes["train_tokens"],
        sizes["m"],
        sizes["val_tokens"],
        groups,
        itemsize=itemsize,
    )
    return int(est[lp.strategy][1]) if lp.strategy in est else 0


def _transient_bytes(lp: LayerPlan, sizes: Mapping[str, int], groups: int, g_item: int) -> int:
    """What scoring one parameter allocates: its strategy's bytes-held estimate less the validation
    gradient `G [groups, P0, P1]` that estimate includes, which the side already holds (its own term)."""
    held = _strategy_bytes(lp, sizes, groups, g_item)
    if get_strategy(lp.strategy).val_gradient is not None:
        p0, p1 = _dense_shape(lp)
        held -= groups * p0 * p1 * g_item
    return max(held, 0)


def joint_scoring_transient(plans: Mapping[str, Plan], itemsize: int = 4) -> int:
    """What `scoring.score_sets` allocates beyond the sides, for its largest parameter (it scores one
    parameter at a time): the sets planned with the same dense strategy are scored together, holding the
    stacked copy of their `G`s and the strategy's buffers at the stacked group count."""
    g_item = 8 if itemsize == 8 else 4
    first = next(iter(plans.values()))
    best = 0
    for pid in first.layers:
        planned: dict[str, list[Plan]] = {}
        for plan in plans.values():
            planned.setdefault(plan.layers[pid].strategy, []).append(plan)
        for name, group in planned.items():
            lp = group[0].layers[pid]
            if get_strategy(name).val_gradient is None or len(group) == 1:
                held = max(_transient_bytes(p.layers[pid], p.sizes, p.sizes["groups"], g_item) for p in group)
            else:  # the stacked copy of the sets' G's, and the strategy's own allocation at that many groups
                groups = sum(p.sizes["groups"] for p in group)
                p0, p1 = _dense_shape(lp)
                held = groups * p0 * p1 * g_item + _transient_bytes(lp, group[0].sizes, groups, g_item)
            best = max(best, held)
    return best


def step_memory(
    plans: Mapping[str, Plan],
    *,
    order: int = 1,
    optimizer_aware: bool = False,
    grad_norms: bool = False,
    itemsize: int = 4,
    per_example: Collection[str] | None = None,
) -> MemoryModel:
    """The bytes one valued step holds for these per-set plans (the Valuer's `plans()`).

    `itemsize`: bytes per captured float (4 for float32, 2 under bf16 autocast, 8 for float64).
    `per_example`: the sets valued per example (default: those planned with more than one group).
    """
    first = next(iter(plans.values()))
    n = first.sizes["n"]
    model = MemoryModel()
    per_layer: dict[str, int] = {}
    train = factor_bytes(first.layers.values(), n, first.sizes["train_tokens"], itemsize, unscaled=n == 1)
    for name, b in train.items():
        per_layer[_layer(name)] = per_layer.get(_layer(name), 0) + b
    model.terms += [MemoryTerm(TRAIN, layer, b) for layer, b in per_layer.items()]
    for set_name, plan in plans.items():
        kept, dense = side_bytes(plan, itemsize)
        each = plan.sizes["groups"] > 1 if per_example is None else set_name in per_example
        model.terms.append(MemoryTerm(SIDE, set_name, kept + dense))
        model.terms.append(MemoryTerm(SCORES, set_name, 8 * n * (1 + (plan.sizes["groups"] if each else 0))))
        if grad_norms and each:
            model.terms.append(MemoryTerm(NORMS, set_name, 8 * plan.sizes["m"]))
        if order == 2:  # combined with "after" and preconditioned in place: no third copy
            model.terms.append(MemoryTerm(BEFORE, set_name, kept + dense))
    if grad_norms:
        model.terms.append(MemoryTerm(NORMS, "train", 8 * n))
    if optimizer_aware:
        pre_item = 8 if itemsize == 8 else 4
        elements = sum(lp.shape[0] * lp.shape[1] for lp in first.layers.values())
        model.terms.append(MemoryTerm(PRE, "all parameters", elements * pre_item))
    model.terms.append(MemoryTerm(TRANSIENT, "", joint_scoring_transient(plans, itemsize)))
    return model


def held_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Logical bytes of distinct tensors (the same tensor, or a same-shaped alias of it, counted once)."""
    seen = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def use_tensors(uses: Mapping[int, list[Use]]) -> list[torch.Tensor | None]:
    """Every factor tensor of a capture's uses (rows and columns)."""
    return [x for us in uses.values() for u in us for x in (u.row, u.col)]
