"""Hooks that capture each supported module's input activations and output gradients.

Training batch: `loss.backward()` runs as usual (so `.grad` and DDP's all-reduce are untouched)
and tensor hooks on module outputs catch `dL/d(output)`. Validation batches: the outputs are kept
and `torch.autograd.grad(sum_of_losses, outputs)` returns the gradients without touching `.grad`.
Either way the gradients are rescaled so that each sample's rows belong to that sample's own loss.

Gradient accumulation: the captures of the micro-batches of one optimizer step are joined
(`join_captures`) into one batch, so every sequence of the step is valued at once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
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
    # [n] float64: the weight of each sequence's loss in the loss that was backpropagated; None = 1/n (the mean)
    weights: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        """`n x T`, the batch's token positions, read from the uses that keep one row per token (a 1-D
        parameter's rows are summed over tokens, `rules.token_sum`)."""
        return max(
            (u.row.shape[0] * u.row.shape[1] for us in self.uses.values() for u in us if u.col is not None),
            default=self.n,
        )

    def scaled(self, w: float | torch.Tensor) -> Captured:
        """Every factor times a scalar or a per-sample weight `[n]`."""
        return Captured(
            self.n, {k: [u.scaled(w) for u in v] for k, v in self.uses.items()}, self.losses, self.weights
        )

    def sample_weights(self) -> torch.Tensor:
        """`[n]` float64 loss weights, the mean's `1/n` when none were given."""
        return (
            self.weights
            if self.weights is not None
            else torch.full((self.n,), 1.0 / self.n, dtype=torch.float64)
        )


_ACTIVATIONS_ONLY: ContextVar[bool] = ContextVar("activations_only", default=False)


def weight_grads_needed() -> bool:
    """False while `Capturer.grads_only` runs a forward: its backward asks for the modules' output gradients
    only. Autograd prunes its own ops' weight gradients there, but cannot tell a custom `Function` that the
    gradient of an input which requires one will go unused (`train.blocked_head` asks here)."""
    return not _ACTIVATIONS_ONLY.get()


def _pad_tokens(t: torch.Tensor, tokens: int) -> torch.Tensor:
    """`t` (`[n, T, ...]`) padded with zeros (index 0 for token ids) to `tokens` positions: adds nothing."""
    if t.shape[1] == tokens:
        return t
    pad = t.new_zeros((t.shape[0], tokens - t.shape[1], *t.shape[2:]))
    return torch.cat([t, pad], dim=1)


def _join_uses(a: Use, b: Use) -> Use:
    """One use over the samples of `a` then `b` (zero tokens pad the shorter one: they add nothing)."""
    tokens = max(a.tokens, b.tokens)
    row = torch.cat([_pad_tokens(a.row, tokens), _pad_tokens(b.row, tokens)])
    col = None if a.col is None else torch.cat([_pad_tokens(a.col, tokens), _pad_tokens(b.col, tokens)])
    return Use(row, col, a.row_index)


def join_captures(a: Captured, b: Captured) -> Captured:
    """The samples of `a` followed by those of `b`: the micro-batches of one accumulated optimizer step."""
    if a.uses.keys() != b.uses.keys() or any(len(a.uses[k]) != len(b.uses[k]) for k in a.uses):
        raise RuntimeError("the micro-batches of one optimizer step used the parameters differently")
    uses = {k: [_join_uses(u, v) for u, v in zip(a.uses[k], b.uses[k], strict=True)] for k in a.uses}
    weights = (
        None
        if a.weights is None and b.weights is None
        else torch.cat([a.sample_weights(), b.sample_weights()])
    )
    return Captured(a.n + b.n, uses, torch.cat([a.losses, b.losses]), weights)


def _rescaled(
    pairs: list[tuple[nn.Parameter, Use]], scale: float | torch.Tensor
) -> list[tuple[nn.Parameter, Use]]:
    """Each use times `scale` (a scalar, or `[n]` per sample), applied to one dense factor of each.

    Why not scale the module's output gradient once, before the rule: for the tied head that gradient is
    `[n, T, 50257]`, and its copy cost more than the rest of the rescaling together. A product of factors
    may be scaled through either, so each use takes the smaller one, or one already scaled for another use
    of the same module (a layer's output gradient serves its weight and its bias: scaled once).
    """
    done: dict[int, torch.Tensor] = {}

    def times(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in done:
            w = scale.to(t.device, t.dtype).view(-1, 1, 1) if isinstance(scale, torch.Tensor) else scale
            done[id(t)] = t * w
        return done[id(t)]

    def dense(u: Use) -> list[torch.Tensor]:
        return [t for t in (None if u.row_index else u.row, u.col) if t is not None]

    picked: dict[int, torch.Tensor] = {}  # use index -> the factor it scales; single-choice uses first
    for i in sorted(range(len(pairs)), key=lambda i: len(dense(pairs[i][1]))):
        options = dense(pairs[i][1])
        cached = [t for t in options if id(t) in done]
        picked[i] = cached[0] if cached else min(options, key=lambda t: t.numel())
        times(picked[i])
    out = []
    for i, (p, u) in enumerate(pairs):
        scaled = done[id(picked[i])]
        use = Use(u.row, scaled, u.row_index) if picked[i] is u.col else Use(scaled, u.col, u.row_index)
        out.append((p, use))
    return out


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

    def _build(
        self, records: list, grads: list[torch.Tensor], n: int, scale: float | torch.Tensor
    ) -> Captured:
        cap = Captured(n)
        for (module, inp, _), g in zip(records, grads, strict=True):
            if g is None:  # output did not influence the loss
                continue
            pairs = rule_for(module)(module, inp, g.detach(), n)
            if isinstance(scale, torch.Tensor) or scale != 1.0:
                pairs = _rescaled(pairs, scale)
            for p, use in pairs:
                cap.uses.setdefault(id(p), []).append(use)
        return cap

    def train(
        self, fn: Callable[[], torch.Tensor], weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Captured]:
        """Run `fn` (-> per-sequence losses `[n]`), backward on their mean; `.grad` as plain training.

        With `weights` (`[n]`) the backward is on `sum_i weights_i * loss_i` instead (gradient
        accumulation, token-mean losses). Returns the backpropagated loss (detached) and the factors,
        rescaled to per-sample losses (times n, or divided by each weight; a zero weight stays zero).
        """
        grads: dict[int, torch.Tensor] = {}
        losses, records = self._run(fn)
        n = losses.shape[0]
        handles = []
        for i, (_, _, out) in enumerate(records):

            def keep(g: torch.Tensor, i: int = i) -> None:
                grads[i] = g

            handles.append(out.register_hook(keep))
        if weights is None:
            loss, scale = losses.mean(), float(n)
        else:
            w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
            if w.shape != (n,):
                raise ValueError(f"weights have shape {tuple(w.shape)}, the batch has {n} sequences")
            loss = (losses * w.to(losses.device, losses.dtype)).sum()
            scale = torch.where(w != 0, 1.0 / w, torch.zeros_like(w))
        try:
            loss.backward()
        finally:
            for h in handles:
                h.remove()
        cap = self._build(records, [grads.get(i) for i in range(len(records))], n, scale)
        cap.losses = losses.detach()
        cap.weights = None if weights is None else w
        missed = [
            name for pid, (name, p) in self.params.items() if pid not in cap.uses and p.grad is not None
        ]
        if missed:  # e.g. gradient checkpointing re-runs modules inside backward, where hooks cannot see them
            raise RuntimeError(
                f"parameters received gradients the engine did not capture: {missed[:5]} "
                "(gradient checkpointing is not supported)"
            )
        return loss.detach(), cap

    def grads_only(self, fn: Callable[[], torch.Tensor]) -> Captured:
        """Run `fn` (-> per-sequence losses `[n]`) and capture factors of their *sum*; `.grad` untouched."""
        token = _ACTIVATIONS_ONLY.set(True)
        try:
            losses, records = self._run(fn)
        finally:
            _ACTIVATIONS_ONLY.reset(token)
        outs = [r[2] for r in records]
        grads = torch.autograd.grad(losses.sum(), outs, allow_unused=True) if outs else []
        cap = self._build(records, list(grads), losses.shape[0], 1.0)
        cap.losses = losses.detach()
        return cap
