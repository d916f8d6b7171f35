"""One valued optimizer step, written once for every training loop (as Opacus wraps the optimizer).

The order matters for what a value means, so it lives here and nowhere else:

1. `backward`: the engine's forward/backward (the gradient plain `loss.backward()` leaves, plus
   what per-sequence values need); called once per micro-batch when gradients accumulate;
2. `synchronize`: (several processes) gradients averaged over ranks, as DDP would;
3. `clip`: the clip factor `c = min(1, clip / (||g|| + 1e-6))` is exactly what torch multiplies the
   gradient by, and it is what the engine gets as `grad_scale`, so values are those of the step taken;
4. `before_optimizer_step`: first-order values (`eta * c * <g_val, g_z>`, per sequence);
5. the optimizer step (ours in `run`, the Trainer's under Hugging Face);
6. `after_optimizer_step`: second-order values (trapezoid), then the values of the *global* batch in
   rank order, ready for the value store.

Each rank values the loss it backpropagated; the step is the mean over ranks of those losses, so
every rank's values are divided by the number of ranks before they are gathered.

Plain (unvalued) training runs the same object with `PlainTraining` in place of the Valuer, so a
loop never branches on whether it values.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
import torch

from attribution.engine.task import LanguageModelingTask, Task
from attribution.engine.valuer import StepValues
from attribution.train import distributed as dist_util


class PlainTraining:
    """The Valuer's training half only (same loss, same `.grad`), for runs without values."""

    order = 1
    optimizer_aware = False

    def __init__(
        self, model: torch.nn.Module, *, task: Task | None = None, autocast_dtype: torch.dtype | None = None
    ):
        self.model = model
        self.task = task or LanguageModelingTask()
        self.autocast_dtype = autocast_dtype

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(next(self.model.parameters()).device.type, dtype=self.autocast_dtype)

    def forward_backward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        weights: torch.Tensor | None = None,
        accumulate: bool = False,
    ) -> float:
        """Backward on the mean of per-sequence losses (or `sum_i weights_i * loss_i`); `.grad` accumulates."""
        with self._autocast():
            losses = self.task.per_sequence_loss(self.model, ids, mask)
            loss = (
                losses.mean() if weights is None else (losses * weights.to(losses.device, losses.dtype)).sum()
            )
            loss.backward()
        return float(loss.detach())

    def values(self, lr: float, *, grad_scale: float = 1.0, optimizer=None) -> None:
        return None

    def after_step(self) -> None:
        return None

    def finish(self) -> None:
        return None


@dataclass
class BatchValues:
    """One step's values for the global batch (rank order), as `ValueStore.add` takes them."""

    per_set: dict[str, np.ndarray]  # float64 [global batch]
    per_example: dict[str, np.ndarray]  # float64 [global batch, validation examples]
    per_example_cos: dict[str, np.ndarray]  # the same, each divided by the two gradient norms


class ValuedStep:
    """The valued optimizer step (see the module docstring); `run` is the whole step for a plain loop.

    `valuer`: an `attribution.engine.Valuer`, or `PlainTraining` for no values. `max_grad_norm`:
    None = no clipping. Per-example values come from the engine one column per validation example
    (`ValSet(groups=)` makes a document's sequences one example).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        valuer,
        info: dist_util.DistInfo,
        *,
        max_grad_norm: float | None,
    ):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.valuer = valuer
        self.info = info
        self.max_grad_norm = max_grad_norm
        self._first_order: StepValues | None = None
        # called as observe(train capture, lr * clip factor, Adam K or None) before each step's values (the sketch)
        self.observers: list = []

    def run(
        self, ids: torch.Tensor, mask: torch.Tensor, lr: float, optimizer: torch.optim.Optimizer
    ) -> tuple[float, BatchValues | None]:
        """One whole step on this rank's slice of the batch: (global mean train loss, global values)."""
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = self.synchronize(self.backward(ids, mask))
        self.before_optimizer_step(lr, self.clip(apply=True), optimizer)
        optimizer.step()
        values = self.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        return loss, values

    def backward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        weights: torch.Tensor | None = None,
        accumulate: bool = False,
    ) -> float:
        """One micro-batch's forward/backward (see `Valuer.forward_backward`); its loss."""
        return self.valuer.forward_backward(ids, mask, weights=weights, accumulate=accumulate)

    def synchronize(self, loss: float) -> float:
        """Average the gradients over ranks; the mean of the ranks' losses."""
        dist_util.average_gradients(self.info, self.params)
        return dist_util.average_scalar(self.info, float(loss))

    def clip(self, *, apply: bool) -> float:
        """The clip factor torch applies; `apply=False` when someone else (the HF Trainer) clips."""
        if self.max_grad_norm is None:
            return 1.0
        if apply:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        return float(torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0))

    def before_optimizer_step(self, lr: float, grad_scale: float, optimizer: torch.optim.Optimizer) -> None:
        """First-order values, from the clipped gradient about to be applied with `lr`."""
        aware = optimizer if self.valuer.optimizer_aware else None
        capture = getattr(self.valuer, "train_capture", None)
        if capture is not None and self.observers:
            pre = self.valuer.preconditioner(aware)
            for observe in self.observers:
                observe(capture, lr * grad_scale, pre)
        self._first_order = self.valuer.values(lr, grad_scale=grad_scale, optimizer=aware)

    def after_optimizer_step(self) -> BatchValues | None:
        """The finished values of the step just taken, for the global batch (every rank must call it)."""
        after = self.valuer.after_step()
        sv = after if self.valuer.order == 2 else self._first_order
        self._first_order = None
        return None if sv is None else self._gather(sv)

    def finish(self) -> None:
        """End of training: let the valuer drop what it still holds."""
        self.valuer.finish()

    def _gather(self, sv: StepValues) -> BatchValues:
        scale = 1.0 / self.info.world  # each rank valued its own loss; the step is the ranks' mean
        gather = functools.partial(dist_util.gather_rows, self.info)
        per_set = {name: gather(np.asarray(v, dtype=np.float64) * scale) for name, v in sv.per_set.items()}
        per_example, per_example_cos = {}, {}
        for name, matrix in sv.per_example.items():
            raw = np.asarray(matrix, dtype=np.float64) * scale
            per_example[name] = gather(raw)
            val_norms = sv.val_example_sq_norm.get(name)
            if sv.train_grad_sq_norm is not None and val_norms is not None:
                denom = np.sqrt(np.outer(np.asarray(sv.train_grad_sq_norm, dtype=np.float64), val_norms))
                cos = np.divide(raw, denom, out=np.zeros_like(raw), where=denom > 0)
                per_example_cos[name] = gather(cos)
        return BatchValues(per_set, per_example, per_example_cos)
