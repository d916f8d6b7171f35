"""The step an optimizer actually takes, as a diagonal preconditioner on the validation gradient.

AdamW's update is `lr * m_hat / (sqrt(v_hat) + eps)` (+ decoupled weight decay). The current batch
enters `m` with weight `(1 - beta1)`, so a training sequence z contributes
`lr * (1-beta1)/(1-beta1^t) * P (g_z / |B|)` with `P = 1/(sqrt(v_hat_t)+eps)`, and to first order
`phi_t(z) = lr/|B| * <P' g_val, g_z>` with `P' = (1-beta1)/(1-beta1^t) * P`.

What is and is not attributed (documented choices, measured in tests/test_engine_shapley.py):
- `v_t` is computed with this step's real (clipped) batch gradient in `.grad`. By default each
  sequence also gets its share of how it raised `v_t`, which shrinks the whole step including the
  carried momentum: the update is a nonlinear function of the batch gradient, and shares are taken
  along the path from no batch to the full batch (see `adam_preconditioner`). Without it
  (`second_moment=False`) values carry a common offset against exact per-step Shapley values.
- Momentum carried from earlier steps (`beta1 * m_{t-1}`) and decoupled weight decay are the same for
  every subset of the batch; they move the weights but belong to no sequence of this batch.
- Momentum carried *into later steps* (`beta1^k` of g_z at step t+k) is ignored: each step values
  only the fraction `(1-beta1)` its own batch contributes to its own update.
"""

from __future__ import annotations

import numpy as np
import torch


def is_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Adam-family optimizers (Adam, AdamW): the ones with a second-moment preconditioner."""
    return all("betas" in g for g in optimizer.param_groups)


PATH_POINTS = 2  # Gauss-Legendre points for the path integral over the batch gradient


@torch.no_grad()
def adam_preconditioner(
    optimizer: torch.optim.Optimizer,
    params: dict[int, torch.nn.Parameter],
    grads: dict[int, torch.Tensor] | None = None,
    *,
    second_moment: bool = True,
    batch_size: int | None = None,
) -> dict[int, torch.Tensor]:
    """`K` per parameter id (param-shaped): `phi(z) = lr * grad_scale / |B| * <K * g_val, g_z>`.

    Plain (`second_moment=False`): `K = (1-beta1)/(1-beta1^t) / (sqrt(v_hat_t)+eps)`, z's share of
    `m_t` with the full batch's `v_t` held fixed.

    Default: AdamW's update is, per coordinate, a *nonlinear* function `u(g)` of the batch gradient
    `g` (through `v_t`, which also shrinks the momentum carried from earlier steps). A sequence's
    share of a function of a sum is approximated by the Aumann-Shapley (path) rule:
    `K = -(1/lr) * mean_{alpha in (0,1)} du/dg (alpha * g)`, by Gauss-Legendre quadrature. Still
    elementwise, so scoring costs the same as first order.
    `grads` defaults to each parameter's `.grad` (the loop calls after clipping, before `step()`).
    """
    if (
        batch_size and batch_size <= PATH_POINTS
    ):  # coalition sizes k = 0..n-1: z joins ~k/n of the batch gradient
        alphas = [(k + 0.5) / batch_size for k in range(batch_size)]
        wts = [1.0 / batch_size] * batch_size
    else:
        nodes, weights = np.polynomial.legendre.leggauss(PATH_POINTS)
        alphas = [(float(x) + 1) / 2 for x in nodes]
        wts = [float(w) / 2 for w in weights]
    out: dict[int, torch.Tensor] = {}
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError("optimizer-aware values support Adam/AdamW without amsgrad/maximize")
        b1, b2 = group["betas"]
        eps = group["eps"]
        for p in group["params"]:
            if id(p) not in params:
                continue
            g = grads[id(p)] if grads is not None else p.grad
            work = torch.float64 if p.dtype == torch.float64 else torch.float32  # fp32 is plenty for a scale
            g = torch.zeros_like(p, dtype=work) if g is None else g.to(work)
            state = optimizer.state.get(p, {})
            step = float(state["step"]) + 1.0 if "step" in state else 1.0
            c1, c2 = 1 - b1**step, 1 - b2**step
            v = state.get("exp_avg_sq")
            m = state.get("exp_avg")
            v = torch.zeros_like(g) if v is None else v.to(work)
            m = torch.zeros_like(g) if m is None else m.to(work)
            if not second_moment:
                k = (1 - b1) / c1 / (((b2 * v + (1 - b2) * g**2) / c2).sqrt_().add_(eps))
            else:  # few fused passes per point: precompute what does not depend on alpha
                base = v.mul(b2 / c2)
                g2 = g.square().mul_((1 - b2) / c2)
                mom = m.mul(b1)
                q = g.mul((1 - b2) / c2)
                k = torch.zeros_like(g)
                for a, w in zip(alphas, wts, strict=True):
                    sq = torch.add(base, g2, alpha=a * a).sqrt_()
                    inv = sq.add(eps).reciprocal_()
                    k.add_(inv, alpha=w * (1 - b1) / c1)
                    # - (b1 m + (1-b1) a g) * a q / (s d^2)
                    t = torch.add(mom, g, alpha=(1 - b1) * a).mul_(q).mul_(inv).mul_(inv)
                    t.div_(sq.clamp_min_(torch.finfo(work).tiny))
                    k.sub_(t, alpha=w * a / c1)
            out[id(p)] = k.to(p.dtype if p.dtype == torch.float64 else torch.float32)
    return out


@torch.no_grad()
def adam_update(
    optimizer: torch.optim.Optimizer,
    params: dict[int, torch.nn.Parameter],
    grads: dict[int, torch.Tensor],
    lr: float,
) -> dict[int, torch.Tensor]:
    """The weight change `w' - w` AdamW would apply with these gradients, without touching its state."""
    out: dict[int, torch.Tensor] = {}
    for group in optimizer.param_groups:
        b1, b2 = group["betas"]
        eps, wd = group["eps"], group.get("weight_decay", 0.0)
        decoupled = "AdamW" in type(optimizer).__name__ or group.get("decoupled_weight_decay", False)
        for p in group["params"]:
            if id(p) not in params:
                continue
            g = grads[id(p)]
            state = optimizer.state.get(p, {})
            step = float(state["step"]) + 1.0 if "step" in state else 1.0
            m = state.get("exp_avg", torch.zeros_like(p))
            v = state.get("exp_avg_sq", torch.zeros_like(p))
            if wd and not decoupled:
                g = g + wd * p
            m_new = b1 * m + (1 - b1) * g
            v_new = b2 * v + (1 - b2) * g * g
            denom = (v_new / (1 - b2**step)).sqrt() + eps
            upd = -lr * (m_new / (1 - b1**step)) / denom
            if wd and decoupled:
                upd = upd - lr * wd * p
            out[id(p)] = upd
    return out
