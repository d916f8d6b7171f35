"""Hooks that capture each supported module's input activations and output gradients.

Training batch: `loss.backward()` runs as usual (so `.grad` and DDP's all-reduce are untouched)
and tensor hooks on module outputs catch `dL/d(output)`. Validation batches: the outputs are kept
and `torch.autograd.grad(sum_of_losses, outputs)` returns the gradients without touching `.grad`.
Either way the gradients are rescaled so that each sample's rows belong to that sample's own loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .rules import Use, rule_for, supported_modules, trainable_params


@dataclass
class Captured:
    """Per-parameter factors of one batch: `uses[id(param)]` lists every module call touching it."""

    n: int
    uses: dict[int, list[Use]] = field(default_factory=dict)
    losses: torch.Tensor | None = None  # [n] per-sequence losses (detached)

    def scaled(self, w: float | torch.Tensor) -> Captured:
        """Every factor times a scalar or a per-sample weight `[n]`."""
        return Captured(self.n, {k: [u.scaled(w) for u in v] for k, v in self.uses.items()}, self.losses)


class Capturer:
    """Registers forward hooks on the model's supported modules; inactive unless inside `capture()`."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = supported_modules(model)
        self.params = trainable_params(model)
        self._active = False
        self._records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self._handles = [m.register_forward_hook(self._hook) for _, m in self.modules]
        covered = {id(p) for _, m in self.modules for p in m.parameters(recurse=False) if p.requires_grad}
        missing = [name for pid, (name, _) in self.params.items() if pid not in covered]
        if missing:  # cannot happen with supported_modules, kept as a guard for custom rules
            raise RuntimeError(f"trainable parameters not covered by any rule: {missing}")

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not self._active or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        self._records.append((module, inputs[0].detach(), output))

    def remove(self) -> None:
        """Remove the hooks (the Valuer keeps them for its lifetime)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _run(self, fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list]:
        self._records = []
        self._active = True
        try:
            losses = fn()
        finally:
            self._active = False
        records, self._records = self._records, []
        return losses, records

    def _build(self, records: list, grads: list[torch.Tensor], n: int, scale: float) -> Captured:
        cap = Captured(n)
        for (module, inp, _), g in zip(records, grads, strict=True):
            if g is None:  # output did not influence the loss
                continue
            if scale != 1.0:
                g = g * scale
            for p, use in rule_for(module)(module, inp, g.detach(), n):
                cap.uses.setdefault(id(p), []).append(use)
        return cap

    def train(self, fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Captured]:
        """Run `fn` (-> per-sequence losses `[n]`), backward on their mean; `.grad` as plain training.

        Returns the mean loss (detached) and the factors, rescaled to per-sample losses (times n).
        """
        grads: dict[int, torch.Tensor] = {}
        losses, records = self._run(fn)
        n = losses.shape[0]
        handles = []
        for i, (_, _, out) in enumerate(records):

            def keep(g: torch.Tensor, i: int = i) -> None:
                grads[i] = g

            handles.append(out.register_hook(keep))
        loss = losses.mean()
        try:
            loss.backward()
        finally:
            for h in handles:
                h.remove()
        cap = self._build(records, [grads.get(i) for i in range(len(records))], n, float(n))
        cap.losses = losses.detach()
        missed = [name for pid, (name, p) in self.params.items() if pid not in cap.uses and p.grad is not None]
        if missed:  # e.g. gradient checkpointing re-runs modules inside backward, where hooks cannot see them
            raise RuntimeError(f"parameters received gradients the engine did not capture: {missed[:5]} "
                               "(gradient checkpointing is not supported)")
        return loss.detach(), cap

    def grads_only(self, fn: Callable[[], torch.Tensor]) -> Captured:
        """Run `fn` (-> per-sequence losses `[n]`) and capture factors of their *sum*; `.grad` untouched."""
        losses, records = self._run(fn)
        outs = [r[2] for r in records]
        grads = torch.autograd.grad(losses.sum(), outs, allow_unused=True) if outs else []
        cap = self._build(records, list(grads), losses.shape[0], 1.0)
        cap.losses = losses.detach()
        return cap
