"""The Task's lean cross-entropy against PyTorch's, in float64: loss, gradient, Hessian-vector product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attribution.engine import task as task_mod
from attribution.engine.task import IGNORE_INDEX, token_cross_entropy


def _case(seed: int = 0, n: int = 9, v: int = 13) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[1, 5]] = IGNORE_INDEX
    weights = torch.randn(n, generator=g, dtype=torch.float64)
    return logits, labels, weights


@pytest.mark.parametrize("block_rows", [None, 2])
def test_loss_and_gradient_equal_pytorch_cross_entropy(monkeypatch, block_rows):
    logits, labels, w = _case()
    if block_rows:  # several row blocks, the last one short
        monkeypatch.setattr(task_mod, "ROW_BLOCK_BYTES", block_rows * logits.shape[1] * logits.element_size())
    ours, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    lo = token_cross_entropy(ours * 1.0, labels)
    lr = F.cross_entropy(ref * 1.0, labels, reduction="none")
    torch.testing.assert_close(lo, lr, rtol=1e-12, atol=1e-12)
    assert lo[1] == 0 and lo[5] == 0
    (lo * w).sum().backward()
    (lr * w).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-12, atol=1e-12)
    assert ours.grad[1].abs().max() == 0  # an ignored row gets no gradient


def test_hessian_vector_product_with_create_graph():
    logits, labels, w = _case(1)
    vec = torch.randn_like(logits)
    hvps = []
    for loss_fn in (token_cross_entropy, lambda x, y: F.cross_entropy(x, y, reduction="none")):
        x = logits.clone().requires_grad_()
        (g,) = torch.autograd.grad((loss_fn(x * 1.0, labels) * w).sum(), x, create_graph=True)
        hvps.append(torch.autograd.grad((g * vec).sum(), x)[0])
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-12, atol=1e-12)
    assert hvps[0].abs().max() > 0


def test_a_second_backward_through_the_same_graph_fails_loudly():
    logits, labels, _ = _case(2)
    loss = token_cross_entropy(logits.clone().requires_grad_() * 1.0, labels).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_no_grad_forward_gives_the_same_losses():
    logits, labels, _ = _case(3)
    with torch.no_grad():
        got = token_cross_entropy(logits, labels)
    torch.testing.assert_close(got, F.cross_entropy(logits, labels, reduction="none"), rtol=1e-12, atol=1e-12)
