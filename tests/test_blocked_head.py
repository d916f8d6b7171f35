"""`train.blocked_head`: the tied head's forward GEMM in blocks of vocabulary rows (a CPU speed fix).

The blocks change how the BLAS is called, not what is computed: these tests check, in float64, that the
blocked head gives nn.Linear's logits and gradients, that the engine values a model with it exactly as one
without it and as brute-force per-sample gradients do, and that a run's CPU model has it, tied."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine_helpers import assert_same_values, one_thread, ragged_batch, tiny_gpt2  # noqa: F401
from torch import nn

from attribution.engine import ValSet, Valuer
from attribution.engine.exact import per_sample_grads
from attribution.engine.task import LanguageModelingTask
from attribution.train.blocked_head import BLOCK_ROWS, BlockedLinear, block_head

VOCAB = 2 * BLOCK_ROWS + 37  # two whole blocks and a partial one


def test_blocked_linear_gives_linear_logits_and_gradients():
    torch.manual_seed(0)
    plain = nn.Linear(24, VOCAB, bias=False).double()
    blocked = nn.Linear(24, VOCAB, bias=False).double()
    blocked.load_state_dict(plain.state_dict())
    assert block_head(blocked) is blocked and type(blocked) is BlockedLinear
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    want, got = plain(x), blocked(x2)
    assert got.shape == want.shape and not got._is_view()  # the lean cross-entropy may reuse its buffer
    # float64: a scale-derived tolerance (a summation order may differ; the values may not)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13 * float(want.detach().abs().max()))
    upstream = torch.randn_like(want)
    (want * upstream).sum().backward()
    (got * upstream).sum().backward()
    for a, b in ((x2.grad, x.grad), (blocked.weight.grad, plain.weight.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * float(b.abs().max()))


def test_heads_that_cannot_be_blocked_are_left_alone():
    with_bias = nn.Linear(8, VOCAB)
    narrow = nn.Linear(8, BLOCK_ROWS, bias=False)
    assert type(block_head(with_bias)) is nn.Linear and type(block_head(narrow)) is nn.Linear


def _values(blocked: bool, order: int, aware: bool):
    model = tiny_gpt2(vocab=VOCAB)
    if blocked:
        block_head(model.lm_head)
    assert (type(model.lm_head) is BlockedLinear) == blocked
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-2)
        if aware
        else torch.optim.SGD(model.parameters(), lr=5e-2)
    )
    ids, mask = ragged_batch(5, 9, seed=3, vocab=VOCAB)
    valuer = Valuer(
        model,
        {
            "each": ValSet(ids, mask, groups=[0, 1, 0, 2, 1]),
            "whole": ValSet(*ragged_batch(3, 9, seed=8, vocab=VOCAB)),
        },
        order=order,
        per_example=["each"],
        optimizer_aware=aware,
    )
    out = []
    for step in range(3):
        valuer.forward_backward(*ragged_batch(4, 10, seed=40 + step, vocab=VOCAB))
        sv = valuer.values(opt.param_groups[0]["lr"], optimizer=opt if aware else None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(valuer.after_step() if order == 2 else sv)
    return out, model


@pytest.mark.parametrize("order,aware", [(1, False), (1, True), (2, False)])
def test_the_engine_values_a_blocked_head_as_an_unblocked_one(order, aware):
    (got, m1), (want, m2) = _values(True, order, aware), _values(False, order, aware)
    assert_same_values(got, want)
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):  # the same training trajectory
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_first_order_values_with_a_blocked_head_are_the_brute_force_dot_products():
    model, lr = tiny_gpt2(vocab=VOCAB), 5e-2
    block_head(model.lm_head)
    vs = ValSet(*ragged_batch(3, 8, seed=5, vocab=VOCAB))
    valuer = Valuer(model, {"each": vs}, per_example=["each"])
    train = ragged_batch(4, 10, seed=40, vocab=VOCAB)
    valuer.forward_backward(*train)
    sv = valuer.values(lr)
    want = (lr / 4) * (per_sample_grads(model, *train) @ per_sample_grads(model, vs.ids, vs.mask).T).numpy()
    np.testing.assert_allclose(sv.per_example["each"], want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_a_runs_cpu_model_has_the_blocked_tied_head():
    from attribution.train.config import RunConfig
    from attribution.train.loop import build_model

    cfg = RunConfig(preset="test-micro", val={"v": "unused.jsonl"}).resolved()
    model = build_model(cfg, "cpu", "float32")
    assert type(model.lm_head) is BlockedLinear
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 50257, (2, 8))
    loss = LanguageModelingTask().per_sequence_loss(model, ids, None).sum()
    loss.backward()
    assert model.transformer.wte.weight.grad is not None


def test_a_validation_pass_skips_the_heads_weight_gradient(monkeypatch):
    """The Valuer's validation pass asks for activation gradients only; the blocked head then skips its
    `[V, d]` weight-gradient GEMM, which a training backward computes."""
    from attribution.train import blocked_head

    skipped = []
    backward = blocked_head._BlockedMatmul.backward

    def spy(ctx, grad):
        out = backward(ctx, grad)
        skipped.append(out[1] is None)
        return out

    monkeypatch.setattr(blocked_head._BlockedMatmul, "backward", staticmethod(spy))
    model = tiny_gpt2(vocab=VOCAB)
    block_head(model.lm_head)
    valuer = Valuer(model, {"v": ValSet(*ragged_batch(2, 6, seed=1, vocab=VOCAB))})
    valuer.forward_backward(*ragged_batch(3, 6, seed=2, vocab=VOCAB))
    assert skipped == [False] and model.lm_head.weight.grad is not None  # training: the weight's gradient
    valuer.values(1e-2)
    assert skipped == [False, True]  # the validation pass: none
