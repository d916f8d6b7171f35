"""The model-specific loss (kronfluence-style `Task`): the engine itself only sees modules.

Why a separate object: the engine needs *per-sequence* losses whose mean is exactly the training
loss, so that per-sample gradients add up to the batch gradient the optimizer sees.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

IGNORE_INDEX = -100
"""A label that counts for nothing (as in `F.cross_entropy`): the position after a sequence's last token."""

ROW_BLOCK_BYTES = 32 << 20
"""Largest temporary the loss allocates: rows of the logits taken at a time for the log-sum-exp."""


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
        ce = token_cross_entropy(logits.reshape(n * t, -1), labels.reshape(-1)).view(n, t)[:, :-1]
        count = valid.sum(1)
        return (ce * valid).sum(1) / count.clamp(min=1)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`[N]` cross-entropy of each row of `logits` (`[N, V]`) against `labels` (`[N]`; -100 = none).

    The same numbers as `F.cross_entropy(..., reduction="none")`, holding one `[N, V]` buffer instead
    of four: the logits are turned into their own gradient during the backward (see
    `_LeanCrossEntropy`), so nothing may read them after the loss.
    """
    return _LeanCrossEntropy.apply(logits, labels)


def _row_blocks(x: torch.Tensor) -> list[slice]:
    step = max(1, ROW_BLOCK_BYTES // max(1, x.shape[1] * x.element_size()))
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]


class _LeanCrossEntropy(torch.autograd.Function):
    """Cross-entropy that keeps the logits and each row's log-sum-exp, and nothing else.

    Why: `F.cross_entropy` saves the log-softmax, a second `[N, V]` tensor, and its backward builds
    two more (the NLL gradient, then the logits' gradient). At the real 50,257-token vocabulary these
    are the largest tensors of a small model's step: 206 MB each for 16 x 64 tokens. Here the backward
    overwrites the logits with `w * (softmax - onehot)`, block by block, and hands that buffer on as
    their gradient. The capture hooks keep the head's *input*, never its output, so no one reads the
    logits afterwards. A second backward through the same graph fails loudly (autograd's version
    check); a backward with `create_graph` (Hessian-vector products) takes an out-of-place path.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=logits.dtype, device=logits.device)
        for rows in _row_blocks(logits):
            lse[rows] = torch.logsumexp(logits[rows], dim=-1)
        keep = labels != IGNORE_INDEX
        target = torch.where(keep, labels, 0)
        picked = logits.gather(1, target[:, None]).squeeze(1)
        ctx.save_for_backward(logits, lse, target, keep)
        return torch.where(keep, lse - picked, torch.zeros_like(lse))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, lse, target, keep = ctx.saved_tensors
        w = torch.where(keep, grad, torch.zeros_like(grad))[:, None]
        if torch.is_grad_enabled():  # create_graph: stay differentiable, leave the logits alone
            return (torch.softmax(logits, dim=-1) * w).scatter_add(1, target[:, None], -w), None
        for rows in _row_blocks(logits):
            logits[rows].sub_(lse[rows, None]).exp_().mul_(w[rows])
        return logits.scatter_add_(1, target[:, None], -w), None
