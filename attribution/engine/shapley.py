"""Public one-shot functions: gradient dot products, ghost gradient norms, and one step's values.

These wrap the same capture/plan/score machinery the in-loop `Valuer` uses, so the tests of these
functions against brute force also test the Valuer's arithmetic. All run with dropout off (eval
mode) so results are deterministic, and none changes the model's parameters or `.grad`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .capture import Capturer
from .optimizer import adam_update, is_adam
from .planner import Plan, choose, resolve_forced
from .rules import canonical_shape
from .scoring import build_val_side, score, sq_norms
from .task import LanguageModelingTask, Task
from .valuer import ValSet, Valuer, eval_mode


@contextlib.contextmanager
def _hooks(model: nn.Module) -> Iterator[Capturer]:
    cap = Capturer(model)
    try:
        yield cap
    finally:
        cap.remove()


@contextlib.contextmanager
def keep_grads(model: nn.Module) -> Iterator[None]:
    """Restore every parameter's `.grad` (object and values) on exit."""
    saved = [(p, p.grad) for p in model.parameters()]
    for p, _ in saved:
        p.grad = None
    try:
        yield
    finally:
        for p, g in saved:
            p.grad = g


def plan_layers(
    model: nn.Module,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    *,
    train_mask: torch.Tensor | None = None,
    val_mask: torch.Tensor | None = None,
    per_example: bool = True,
    optimizer_aware: bool = False,
    strategy: str | dict[str, str] | None = None,
    task: Task | None = None,
) -> Plan:
    """The per-parameter plan (strategy, estimated costs, reason) for these batch shapes; print it."""
    task = task or LanguageModelingTask()
    with _hooks(model) as cap, eval_mode(model), keep_grads(model):
        train = cap.grads_only(lambda: task.per_sequence_loss(model, train_ids, train_mask))
        return _make_plan(cap, train, val_ids, per_example, optimizer_aware, strategy)


def _make_plan(
    cap: Capturer, train, val_ids: torch.Tensor, per_example: bool, optimizer_aware: bool, strategy
) -> Plan:
    m = val_ids.shape[0]
    sizes = {
        "n": train.n,
        "train_tokens": train.tokens,
        "m": m,
        "val_tokens": val_ids.numel(),
        "groups": m if per_example else 1,
    }
    plan = Plan(sizes=sizes)
    for pid, uses in train.uses.items():
        name = cap.params[pid][0]
        plan.layers[pid] = choose(
            name,
            canonical_shape(cap.params[pid][1]),
            uses,
            sizes,
            optimizer_aware=optimizer_aware,
            forced=resolve_forced(name, strategy),
        )
    return plan


def grad_dot_products(
    model: nn.Module,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    *,
    train_mask: torch.Tensor | None = None,
    val_mask: torch.Tensor | None = None,
    strategy: str | dict[str, str] | None = None,
    task: Task | None = None,
) -> torch.Tensor:
    """`[n_train, n_val]` float64: `<grad loss(train_i), grad loss(val_k)>` over every trainable parameter.

    Tied parameters count once with all their uses (cross terms included). `strategy` forces one
    strategy for all parameters (a name) or some (dict keyed by parameter name or prefix).
    """
    task = task or LanguageModelingTask()
    with _hooks(model) as cap, eval_mode(model), keep_grads(model):
        train = cap.grads_only(lambda: task.per_sequence_loss(model, train_ids, train_mask))
        val = cap.grads_only(lambda: task.per_sequence_loss(model, val_ids, val_mask))
        plan = _make_plan(cap, train, val_ids, True, False, strategy)
        shapes = {pid: canonical_shape(p) for pid, (_, p) in cap.params.items()}
        side = build_val_side(val, plan, shapes, per_example=True)
        return score(train, side, plan, shapes)


def grad_norms(
    model: nn.Module, ids: torch.Tensor, *, mask: torch.Tensor | None = None, task: Task | None = None
) -> torch.Tensor:
    """`[n]` float64 per-sample squared gradient norms by the ghost trick (tied cross terms included)."""
    task = task or LanguageModelingTask()
    with _hooks(model) as cap, eval_mode(model), keep_grads(model):
        got = cap.grads_only(lambda: task.per_sequence_loss(model, ids, mask))
        return sq_norms(got, Plan())


def step_values(
    model: nn.Module,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    lr: float,
    *,
    order: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    train_mask: torch.Tensor | None = None,
    val_mask: torch.Tensor | None = None,
    strategy: str | dict[str, str] | None = None,
    task: Task | None = None,
    second_moment: bool = True,
) -> torch.Tensor:
    """`[n_train]` float64 In-Run Shapley values of one step (mean loss over the batch), positive = helped.

    With an Adam-family `optimizer`, values are for the step it would take from its current state
    (read, never changed); `optimizer=None` is the paper's SGD formula. Order 2 takes that step
    on a copy of the weights in place, evaluates the validation gradient there, and restores them.
    """
    aware = optimizer is not None and is_adam(optimizer)
    valuer = Valuer(
        model,
        {"val": ValSet(val_ids, val_mask)},
        order=order,
        optimizer_aware=aware,
        strategy=strategy,
        task=task,
        second_moment=second_moment,
    )
    try:
        with eval_mode(model), keep_grads(model):
            valuer.forward_backward(train_ids, train_mask)
            sv = valuer.values(lr, optimizer=optimizer if aware else None)
            if order == 2:
                params = {pid: p for pid, (_, p) in valuer.capturer.params.items()}
                grads = {
                    pid: p.grad if p.grad is not None else torch.zeros_like(p) for pid, p in params.items()
                }
                if aware:
                    upd = adam_update(optimizer, params, grads, lr)
                else:
                    upd = {pid: -lr * g for pid, g in grads.items()}
                saved = {pid: p.detach().clone() for pid, p in params.items()}
                try:
                    with torch.no_grad():
                        for pid, p in params.items():
                            p.add_(upd[pid])
                    sv = valuer.after_step()
                finally:
                    with torch.no_grad():
                        for pid, p in params.items():
                            p.copy_(saved[pid])
    finally:
        valuer.close()
    assert sv is not None
    return torch.from_numpy(sv.per_set["val"])
