"""The model-specific loss (kronfluence-style `Task`): the engine itself only sees modules.

Why a separate object: the engine needs *per-sequence* losses whose mean is exactly the training
loss, so that per-sample gradients add up to the batch gradient the optimizer sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
"""A label that counts for nothing (as in `F.cross_entropy`): the position after a sequence's last token."""

ROW_BLOCK_BYTES = 4 << 20
"""Rows of the logits the loss takes at a time: its largest temporary (the block's softmax), small enough
that the passes over a block stay in cache (docs/benchmarks.md, "Session 14")."""


_TWICE: ContextVar[bool] = ContextVar("twice_differentiable", default=False)


class Task(Protocol):
    """Maps (model, ids, mask) to one loss per sequence; the batch loss is their mean."""

    def per_sequence_loss(
        self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Return a `[n]` tensor: the loss of each sequence on its own."""
        ...


class LanguageModelingTask:
    """Causal LM loss: mean next-token cross-entropy over the positions whose *label* is real.

    The label at position t is `ids[t+1]`; it counts when `mask[t+1] == 1` and `mask[t] == 1`.
    Explicit `[n, T]` position ids are passed so that position-embedding outputs keep a batch
    dimension (HF broadcasts `[1, T]` position ids otherwise, which merges the samples' gradients).
    """

    causal = True
    """No position's loss depends on a later position, so columns that are padding in every sequence of
    a batch, at its end, change no loss or gradient: the Valuer drops them from validation sets
    (`ValSet.trimmed`). A Task without this attribute keeps its validation sets as given."""

    def __init__(self, *, pass_position_ids: bool = True):
        self.pass_position_ids = pass_position_ids

    def per_sequence_loss(
        self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """`[n]` mean cross-entropy per sequence (0 for a sequence without any label token)."""
        ids = ids.long()
        n, t = ids.shape
        if mask is None:
            mask = torch.ones_like(ids)
        mask = mask.to(ids.device)
        kwargs: dict = {"input_ids": ids, "attention_mask": mask.long()}
        if self.pass_position_ids:
            kwargs["position_ids"] = torch.arange(t, device=ids.device).unsqueeze(0).expand(n, t)
        out = model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # CE in at least fp32 under autocast; float64 models stay float64
        # Labels shifted left, the last position ignored: the [n*T, V] logits are a view, never a copy.
        labels = torch.cat([ids[:, 1:], ids.new_full((n, 1), IGNORE_INDEX)], dim=1)
        valid = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
        ce = token_cross_entropy(logits, labels)[:, :-1]
        count = valid.sum(1)
        return (ce * valid).sum(1) / count.clamp(min=1)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each position: `logits` `[..., V]`, `labels` `[...]` (-100 = none) -> `[...]`.

    The numbers of `F.cross_entropy(..., reduction="none")` to float rounding, with one `[N, V]` buffer
    where PyTorch's holds four (see `_LeanCrossEntropy`). When a gradient will be taken and `logits` is
    not a view, its buffer becomes the gradient: nothing may read the logits after the loss. Inside
    `twice_differentiable()` PyTorch's own loss is used instead.
    """
    flat, target = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    if _TWICE.get():
        loss = F.cross_entropy(flat, target, reduction="none", ignore_index=IGNORE_INDEX)
    elif torch.is_grad_enabled() and logits.requires_grad:
        # a view's in-place change would make autograd re-derive its grad_fn, which loses the hooks
        # that capture its gradient (a linear head with a bias returns a view): write a new buffer
        loss = _LeanCrossEntropy.apply(flat, target, not logits._is_view())
    else:
        with torch.no_grad():
            loss = _softmax_losses(flat, target, None)
    return loss.view(labels.shape)


@contextmanager
def twice_differentiable() -> Iterator[None]:
    """Inside: the loss's gradient can be differentiated again (Hessian-vector products, `engine.exact`).

    The lean loss hands its logits on as their own gradient, which autograd cannot differentiate; this
    keeps PyTorch's cross-entropy (and its three extra `[N, V]` buffers) for the code that needs it.
    """
    token = _TWICE.set(True)
    try:
        yield
    finally:
        _TWICE.reset(token)


def _row_blocks(x: torch.Tensor) -> list[slice]:
    step = max(1, ROW_BLOCK_BYTES // max(1, x.shape[1] * x.element_size()))
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]


def _softmax_losses(logits: torch.Tensor, labels: torch.Tensor, into: torch.Tensor | None) -> torch.Tensor:
    """`[N]` losses from a softmax taken block by block; `into` (may be `logits`): softmax - onehot.

    One fused softmax per block (one exp per logit, where log-softmax and its backward take two), and
    the log-sum-exp read back from it: `lse = max(x) - log(max(p))`, exact where `p` underflows too.
    The softmax is written straight into `into` (over the logits themselves when `into` is `logits`:
    what a block's loss needs of `x` is read first), not into a new block that is then copied.
    """
    keep = labels != IGNORE_INDEX
    target = torch.where(keep, labels, 0)
    loss = torch.empty(logits.shape[0], dtype=logits.dtype, device=logits.device)
    for rows in _row_blocks(logits):
        x = logits[rows]
        x_max, x_target = x.amax(dim=-1), x.gather(1, target[rows, None]).squeeze(1)
        p = torch.softmax(x, dim=-1) if into is None else torch.softmax(x, dim=-1, out=into[rows])
        loss[rows] = x_max - p.amax(dim=-1).log() - x_target
    if into is not None:
        into.scatter_add_(1, target[:, None], -keep.to(into.dtype)[:, None])
    return torch.where(keep, loss, torch.zeros_like(loss))


class _LeanCrossEntropy(torch.autograd.Function):
    """Cross-entropy whose forward leaves the gradient in one `[N, V]` buffer and keeps nothing else.

    Why: `F.cross_entropy` saves the log-softmax, a second `[N, V]` tensor, and its backward builds
    two more (the NLL gradient, then the logits' gradient). At the real 50,257-token vocabulary these
    are the largest tensors of a small model's step: 206 MB each for 16 x 64 tokens. The gradient of a
    row's loss is `softmax - onehot` whatever comes after, so the forward writes it as it computes the
    loss, over the logits themselves when `in_place`, and the backward only scales each row by its
    upstream gradient, in place. The logits' producer must not need them for its own backward: a
    linear head keeps its input, not its output, and autograd's version check fails loudly for one
    that does.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, in_place: bool) -> torch.Tensor:
        buf = logits if in_place else torch.empty_like(logits)
        loss = _softmax_losses(logits, labels, buf)
        ctx.save_for_backward(buf, labels != IGNORE_INDEX)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the lean cross-entropy cannot be differentiated twice: compute the loss inside "
                "attribution.engine.task.twice_differentiable() for Hessian-vector products"
            )
        probs_minus_onehot, keep = ctx.saved_tensors
        w = torch.where(keep, grad, torch.zeros_like(grad))
        return probs_minus_onehot.mul_(w[:, None]), None, None
