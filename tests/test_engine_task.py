"""The Task's lean cross-entropy against PyTorch's, in float64: loss, gradient, Hessian-vector product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attribution.engine import task as task_mod
from attribution.engine.task import IGNORE_INDEX, token_cross_entropy, twice_differentiable


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


def test_hessian_vector_products_inside_twice_differentiable():
    logits, labels, w = _case(1)
    vec = torch.randn_like(logits)
    hvps = []
    for lean in (True, False):
        x = logits.clone().requires_grad_()
        with twice_differentiable():
            loss = (
                token_cross_entropy(x * 1.0, labels)
                if lean
                else F.cross_entropy(x * 1.0, labels, reduction="none")
            )
            (g,) = torch.autograd.grad((loss * w).sum(), x, create_graph=True)
        hvps.append(torch.autograd.grad((g * vec).sum(), x)[0])
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-12, atol=1e-12)
    assert hvps[0].abs().max() > 0


def test_the_lean_loss_refuses_a_second_derivative_loudly():
    logits, labels, _ = _case(2)
    x = logits.clone().requires_grad_()
    loss = token_cross_entropy(x * 1.0, labels).sum()
    with pytest.raises(RuntimeError, match="twice_differentiable"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_the_logits_buffer_becomes_the_gradient():
    """The memory claim itself: the gradient handed to the head is the logits' own storage."""
    logits, labels, w = _case(4)
    x = logits.clone().requires_grad_()
    y = x * 1.0
    seen = []
    y.register_hook(lambda g: seen.append(g))
    (token_cross_entropy(y, labels) * w).sum().backward()
    assert seen[0].data_ptr() == y.data_ptr()


def test_a_view_keeps_its_values_and_its_gradient_hooks():
    """A linear head with a bias returns a view: it gets a new buffer, and hooks on it still fire."""
    head = torch.nn.Linear(4, 13).double()
    h = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    logits = head(h)
    assert logits._is_view()
    before = logits.detach().clone()
    labels = torch.randint(0, 13, (2, 5))
    seen = []
    logits.register_hook(lambda g: seen.append(g.clone()))
    token_cross_entropy(logits, labels).sum().backward()
    assert torch.equal(logits.detach(), before)
    ref = torch.softmax(before, -1) - F.one_hot(labels, 13).double()
    torch.testing.assert_close(seen[0], ref, rtol=1e-12, atol=1e-12)


def test_a_producer_that_keeps_the_logits_fails_loudly():
    """Overwriting logits that their producer needs (exp keeps its output) must not pass silently."""
    z = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace"):
        token_cross_entropy(torch.exp(z), torch.tensor([1, 2, 3, 0])).sum().backward()


def test_extreme_logits_give_finite_exact_losses():
    """A target whose probability underflows float32 still gets its true loss (lse - x_t), not inf."""
    x = torch.tensor([[0.0, 200.0, -300.0], [50.0, 0.0, 0.0]], dtype=torch.float32, requires_grad=True)
    labels = torch.tensor([2, 0])
    got = token_cross_entropy(x * 1.0, labels)
    ref = F.cross_entropy(x.detach().double(), labels, reduction="none").float()
    torch.testing.assert_close(got.detach(), ref, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(got).all() and got[0] > 400


def test_a_second_backward_through_the_same_graph_fails_loudly():
    logits, labels, _ = _case(2)
    loss = token_cross_entropy(logits.clone().requires_grad_() * 1.0, labels).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_no_grad_forward_gives_the_same_losses_and_leaves_the_logits_alone():
    logits, labels, _ = _case(3)
    before = logits.clone()
    with torch.no_grad():
        got = token_cross_entropy(logits, labels)
    assert torch.equal(logits, before)
    torch.testing.assert_close(got, F.cross_entropy(logits, labels, reduction="none"), rtol=1e-12, atol=1e-12)
