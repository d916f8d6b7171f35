"""Valuer.forward_backward(weights=, accumulate=): an optimizer step over several micro-batches."""

from __future__ import annotations

import torch
from test_engine_helpers import one_thread, ragged_batch, tiny_gpt2  # noqa: F401

from attribution.engine import ValSet, Valuer
from attribution.engine.exact import per_sample_grads
from attribution.engine.rules import trainable_params


def test_weighted_micro_batches_of_different_lengths_match_brute_force():
    model = tiny_gpt2()
    a_ids, a_mask = ragged_batch(3, 10, seed=3)
    b_ids, b_mask = ragged_batch(2, 7, seed=4)  # shorter: the joined captures are padded
    va, vm = ragged_batch(3, 9, seed=7)
    weights = torch.tensor([0.1, 0.3, 0.2, 0.4, 0.0], dtype=torch.float64)  # a zero weight stays zero
    valuer = Valuer(model, {"v": ValSet(va, vm, ["a", "b", "c"])}, per_example=["v"])
    loss_a = valuer.forward_backward(a_ids, a_mask, weights=weights[:3], accumulate=True)
    loss_b = valuer.forward_backward(b_ids, b_mask, weights=weights[3:], accumulate=True)
    sv = valuer.values(0.1, grad_scale=0.5)

    g_train = torch.cat(
        [per_sample_grads(model, a_ids, a_mask), per_sample_grads(model, b_ids, b_mask)]
    ).double()
    g_val = per_sample_grads(model, va, vm).double()
    step_grad = weights @ g_train
    grad = torch.cat([p.grad.reshape(-1) for _, p in trainable_params(model).values()]).double()
    assert float((grad - step_grad).abs().max()) <= 1e-12 * float(step_grad.abs().max())  # .grad accumulated
    with torch.no_grad():
        losses = torch.cat(
            [valuer.task.per_sequence_loss(model, i, m) for i, m in ((a_ids, a_mask), (b_ids, b_mask))]
        )
    assert abs(loss_a + loss_b - float(weights @ losses.double())) <= 1e-12

    expected = 0.1 * 0.5 * weights[:, None] * (g_train @ g_val.t())
    got = torch.from_numpy(sv.per_example["v"])
    assert got.shape == (5, 3)
    assert float((got - expected).abs().max()) <= 1e-10 * float(expected.abs().max())
    assert torch.equal(got[4], torch.zeros(3, dtype=torch.float64))
    assert float(abs(torch.from_numpy(sv.per_set["v"]) - expected.sum(1)).max()) <= 1e-10 * float(
        expected.abs().max()
    )
