"""The model-specific loss (kronfluence-style `Task`): the engine itself only sees modules.

Why a separate object: the engine needs *per-sequence* losses whose mean is exactly the training
loss, so that per-sample gradients add up to the batch gradient the optimizer sees.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


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
        labels = torch.cat([ids[:, 1:], ids.new_full((n, 1), -100)], dim=1)
        valid = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
        ce = F.cross_entropy(logits.reshape(n * t, -1), labels.reshape(-1), reduction="none").view(n, t)[
            :, :-1
        ]
        count = valid.sum(1)
        return (ce * valid).sum(1) / count.clamp(min=1)
