"""Brute-force references for tests: per-sample gradients by a loop, exact per-step Shapley over all
subsets, and the exact second-order Taylor value by a double-backward Hessian-vector product.

Slow on purpose and independent of the engine's factorization: the ground truth must not share
the code it checks. Use float64 models, dropout 0 (everything runs in eval mode anyway).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .rules import trainable_params
from .task import LanguageModelingTask, Task, twice_differentiable
from .valuer import eval_mode


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, p in trainable_params(model).values()]


def per_sample_grads(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None, task: Task | None = None
) -> torch.Tensor:
    """`[n, D]` flattened per-sequence gradients, one autograd call per sequence (tied params once)."""
    task = task or LanguageModelingTask()
    params = _params(model)
    mask = torch.ones_like(ids) if mask is None else mask
    rows = []
    with eval_mode(model):
        for i in range(ids.shape[0]):
            loss = task.per_sequence_loss(model, ids[i : i + 1], mask[i : i + 1]).sum()
            gs = torch.autograd.grad(loss, params, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1)
                        for g, p in zip(gs, params, strict=True)
                    ]
                )
            )
    return torch.stack(rows)


def brute_grad_dot_products(
    model, train_ids, val_ids, *, train_mask=None, val_mask=None, task=None
) -> torch.Tensor:
    """`[n_train, n_val]` from materialized per-sample gradients."""
    gt = per_sample_grads(model, train_ids, train_mask, task).double()
    gv = per_sample_grads(model, val_ids, val_mask, task).double()
    return gt @ gv.t()


def _val_loss(model: nn.Module, val_ids, val_mask, task: Task) -> float:
    with torch.no_grad(), eval_mode(model):
        return float(task.per_sequence_loss(model, val_ids, val_mask).double().sum())


def _set_flat(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    with torch.no_grad():
        off = 0
        for p in params:
            p.copy_(flat[off : off + p.numel()].view_as(p))
            off += p.numel()


def _shapley_from_utilities(u: torch.Tensor, n: int) -> torch.Tensor:
    """Exact Shapley values from the utility of every subset (bitmask-indexed)."""
    phi = torch.zeros(n, dtype=torch.float64)
    sizes = torch.tensor([bin(s).count("1") for s in range(1 << n)])
    w = torch.tensor(
        [math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n) for k in range(n)],
        dtype=torch.float64,
    )
    for i in range(n):
        for s in range(1 << n):
            if not s >> i & 1:
                phi[i] += w[sizes[s]] * (u[s | 1 << i] - u[s])
    return phi


def exact_step_shapley(
    model: nn.Module,
    train_ids,
    train_mask,
    val_ids,
    val_mask,
    lr: float,
    optimizer: torch.optim.Optimizer | None = None,
    task: Task | None = None,
) -> torch.Tensor:
    """Exact Shapley values of one step over all 2^|B| subsets of the batch (|B| <= 10).

    Utility `U(S) = L_val(w) - L_val(w_S)`. SGD (`optimizer=None`): `w_S = w - lr/|B| sum_{j in S} g_j`.
    With an optimizer: a fresh copy of it (same class, hyper-parameters and a deep copy of its real
    state) takes one real `step()` on cloned weights whose gradient is the subset's contribution to
    the batch mean, `(1/|B|) sum_{j in S} g_j`. The model is restored afterwards.
    """
    task = task or LanguageModelingTask()
    n = train_ids.shape[0]
    if n > 10:
        raise ValueError("exact Shapley enumerates 2^n subsets; keep the batch at 10 or fewer")
    params = _params(model)
    g = per_sample_grads(model, train_ids, train_mask, task)
    w0 = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    base = _val_loss(model, val_ids, val_mask, task)
    util = torch.zeros(1 << n, dtype=torch.float64)
    try:
        for s in range(1 << n):
            sel = [j for j in range(n) if s >> j & 1]
            gsum = g[sel].sum(0) / n if sel else torch.zeros_like(w0)
            if optimizer is None:
                w = w0 - lr * gsum
            else:
                w = _real_optimizer_step(optimizer, params, w0, gsum, lr)
            _set_flat(params, w)
            util[s] = base - _val_loss(model, val_ids, val_mask, task)
    finally:
        _set_flat(params, w0)
    return _shapley_from_utilities(util, n)


def _real_optimizer_step(optimizer, params, w0: torch.Tensor, gflat: torch.Tensor, lr: float) -> torch.Tensor:
    """Weights after one real step of a cloned optimizer (its state deep-copied) with gradient gflat."""
    clones, off = [], 0
    for p in params:  # start from w0, not from the model (which holds the previous subset's weights)
        clones.append(nn.Parameter(w0[off : off + p.numel()].view_as(p).clone()))
        off += p.numel()
    index = {id(p): k for k, p in enumerate(params)}
    groups = []
    for grp in optimizer.param_groups:
        opts = {k: v for k, v in grp.items() if k != "params"}
        opts["lr"] = lr
        groups.append({**opts, "params": [clones[index[id(p)]] for p in grp["params"] if id(p) in index]})
    opt = type(optimizer)(groups)
    state = copy.deepcopy(optimizer.state_dict())
    for grp_sd in state["param_groups"]:  # same order and sizes as the original groups
        grp_sd["lr"] = lr
    opt.load_state_dict(state)
    off = 0
    for c in clones:
        c.grad = gflat[off : off + c.numel()].view_as(c).clone()
        off += c.numel()
    opt.step()
    return torch.cat([c.detach().reshape(-1) for c in clones])


def exact_second_order(
    model: nn.Module,
    train_ids,
    train_mask,
    val_ids,
    val_mask,
    lr: float,
    task: Task | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first order, second order) Taylor values under SGD with a double-backward HVP.

    `phi2(z) = lr_e <g_val, g_z> - lr_e^2/2 g_z^T H_val sum_j g_j`, lr_e = lr/|B|. The model must use
    eager attention (`attn_implementation="eager"`): fused SDPA has no double backward on CPU.
    """
    task = task or LanguageModelingTask()
    n = train_ids.shape[0]
    lr_e = lr / n
    params = _params(model)
    g = per_sample_grads(model, train_ids, train_mask, task).double()
    with eval_mode(model), twice_differentiable():
        vloss = task.per_sequence_loss(model, val_ids, val_mask).sum()
        gv = torch.autograd.grad(vloss, params, create_graph=True)
        gv_flat = torch.cat([x.reshape(-1) for x in gv])
        v = g.sum(0).to(gv_flat.dtype)
        hv = torch.autograd.grad((gv_flat * v).sum(), params)
    hv_flat = torch.cat([x.reshape(-1) for x in hv]).double()
    first = lr_e * (g @ gv_flat.detach().double())
    second = first - 0.5 * lr_e**2 * (g @ hv_flat)
    return first, second
