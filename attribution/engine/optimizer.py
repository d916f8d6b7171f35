"""The step an optimizer actually takes, as a diagonal preconditioner on the validation gradient.

AdamW's update is `lr * m_hat / (sqrt(v_hat) + eps)` (+ decoupled weight decay). The current batch
enters `m` with weight `(1 - beta1)`, so a training sequence z contributes
`lr * (1-beta1)/(1-beta1^t) * P (g_z / |B|)` with `P = 1/(sqrt(v_hat_t)+eps)`, and to first order
`phi_t(z) = lr/|B| * <P' g_val, g_z>` with `P' = (1-beta1)/(1-beta1^t) * P`.

What is and is not attributed (documented choices, measured in tests/test_engine_shapley.py):
- `v_t` is taken *after* this step's update with the real (clipped) batch gradient in `.grad`; its
  dependence on which sequences are in the batch is not attributed (first-order treatment).
- Momentum carried from earlier steps (`beta1 * m_{t-1}`) and decoupled weight decay are the same for
  every subset of the batch; they move the weights but belong to no sequence of this batch.
- Momentum carried *into later steps* (`beta1^k` of g_z at step t+k) is ignored: each step values
  only the fraction `(1-beta1)` its own batch contributes to its own update.
"""

from __future__ import annotations

import torch


def is_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Adam-family optimizers (Adam, AdamW): the ones with a second-moment preconditioner."""
    return all("betas" in g for g in optimizer.param_groups)


@torch.no_grad()
def adam_preconditioner(
    optimizer: torch.optim.Optimizer, params: dict[int, torch.nn.Parameter], grads: dict[int, torch.Tensor] | None = None
) -> dict[int, torch.Tensor]:
    """`P'` per parameter id (param-shaped), from the optimizer's real state and this step's gradient.

    `grads` defaults to each parameter's `.grad` (the loop calls after clipping, before `step()`).
    """
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
            if g is None:
                g = torch.zeros_like(p)
            state = optimizer.state.get(p, {})
            step = float(state["step"]) + 1.0 if "step" in state else 1.0
            v = state.get("exp_avg_sq")
            v_new = (1 - b2) * g.double() ** 2 if v is None else b2 * v.double() + (1 - b2) * g.double() ** 2
            denom = (v_new / (1 - b2**step)).sqrt() + eps
            out[id(p)] = ((1 - b1) / (1 - b1**step) / denom).to(p.dtype if p.dtype == torch.float64 else torch.float32)
    return out


@torch.no_grad()
def adam_update(
    optimizer: torch.optim.Optimizer, params: dict[int, torch.nn.Parameter], grads: dict[int, torch.Tensor], lr: float
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
