"""Validation sets padded past their longest text (`ValSet.trimmed`): the Valuer drops the columns that are
padding in every sequence, for a causal task only, and every value stays what the padded set gives.

Why it matters: the loop pads each validation text to the training length, so a 64-token text costs a
128-token validation pass and ghost Gram products twice the size. Float64 against the same Valuer
without the trim, and against brute-force per-sample gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine_helpers import VOCAB, assert_same_values, one_thread, ragged_batch, tiny_gpt2  # noqa: F401

from attribution.engine import ValSet, Valuer
from attribution.engine.exact import per_sample_grads
from attribution.engine.task import LanguageModelingTask

REAL, PADDED = 7, 12  # the longest text has 7 tokens; the rows are 12 wide


class NotCausal:
    """The same loss without the `causal` promise: a Task the Valuer must not trim for."""

    def per_sequence_loss(self, model, ids, mask):
        return LanguageModelingTask().per_sequence_loss(model, ids, mask)


def padded_set(n: int, seed: int) -> ValSet:
    ids, mask = ragged_batch(n, REAL, seed=seed)
    extra = torch.randint(0, VOCAB, (n, PADDED - REAL), generator=torch.Generator().manual_seed(seed + 1))
    ids = torch.cat([ids, extra], 1)  # real-looking ids under mask 0: a trim that kept them would still agree
    mask = torch.cat([mask, torch.zeros(n, PADDED - REAL, dtype=mask.dtype)], 1)
    return ValSet(ids, mask, groups=[0, 1, 0, 2, 1][:n])


def test_trimmed_drops_only_columns_that_are_padding_everywhere():
    vs = padded_set(5, seed=3)
    t = vs.trimmed()
    assert t.ids.shape == (5, REAL) and t.mask.shape == (5, REAL)
    assert int(t.mask[:, -1].sum()) > 0  # the last kept column is real somewhere
    assert torch.equal(t.ids, vs.ids[:, :REAL]) and torch.equal(t.mask, vs.mask[:, :REAL])
    assert t.names == vs.names and torch.equal(t.groups, vs.groups)
    assert t.trimmed() is t  # nothing left to drop
    assert Valuer(tiny_gpt2(), {"v": vs}).val_sets["v"].ids.shape[1] == REAL
    assert Valuer(tiny_gpt2(), {"v": vs}, task=NotCausal()).val_sets["v"].ids.shape[1] == PADDED


def _values(task, *, order: int, aware: bool, strategy: str | None):
    model = tiny_gpt2()
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-2)
        if aware
        else torch.optim.SGD(model.parameters(), lr=5e-2)
    )
    valuer = Valuer(
        model,
        {"each": padded_set(5, seed=3), "whole": padded_set(4, seed=8)},
        order=order,
        per_example=["each"],
        optimizer_aware=aware,
        strategy=strategy,
        grad_norms=True,
        val_chunk=2,
        task=task,
    )
    out = []
    for step in range(3):
        valuer.forward_backward(*ragged_batch(4, 10, seed=40 + step))
        sv = valuer.values(opt.param_groups[0]["lr"], optimizer=opt if aware else None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(valuer.after_step() if order == 2 else sv)
    return out


@pytest.mark.parametrize(
    "order,aware,strategy",
    [
        (1, False, None),
        (1, False, "ghost"),
        (1, True, None),
        (2, False, "project"),
        (2, False, "ghost"),
        (2, True, None),
    ],
)
def test_trimmed_values_equal_the_padded_sets(order, aware, strategy):
    trimmed = _values(LanguageModelingTask(), order=order, aware=aware, strategy=strategy)
    padded = _values(NotCausal(), order=order, aware=aware, strategy=strategy)
    assert_same_values(trimmed, padded)
    for got, want in zip(trimmed, padded, strict=True):
        for name in ("each", "whole"):
            assert got.val_loss[name] == pytest.approx(want.val_loss[name], rel=1e-12)
            assert got.val_grad_sq_norm[name] == pytest.approx(want.val_grad_sq_norm[name], rel=1e-10)
        np.testing.assert_allclose(
            got.val_example_sq_norm["each"], want.val_example_sq_norm["each"], rtol=1e-10
        )


def test_trimmed_first_order_values_are_the_brute_force_dot_products():
    model, lr = tiny_gpt2(), 5e-2
    vs = padded_set(5, seed=3)
    valuer = Valuer(model, {"each": vs}, per_example=["each"], val_chunk=2)
    train = ragged_batch(4, 10, seed=40)
    valuer.forward_backward(*train)
    sv = valuer.values(lr)
    g_train = per_sample_grads(model, *train)
    g_val = per_sample_grads(model, vs.ids, vs.mask)  # the padded rows, as given
    doc = torch.zeros(3, g_val.shape[1], dtype=g_val.dtype).index_add_(0, vs.groups, g_val)
    want = (lr / 4) * (g_train @ doc.T).numpy()
    np.testing.assert_allclose(sv.per_example["each"], want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_the_pass_takes_like_lengths_together_and_trims_each_chunk():
    """Twelve texts of three full sequences and a short tail each (the twelve-text shape, narrower): taken
    longest first, the tails share chunks, which are cut to the tail's length; the plan counts the
    positions the pass computes (40 x 16 + 8 x 5 = 680, not 48 x 16 = 768). Not for a task without the
    causal promise."""
    t, tail = 16, 5  # the same structure, narrower: 12 texts x (16, 16, 16, 5)
    lengths = [t, t, t, tail] * 12
    mask = (torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    ids = torch.randint(0, VOCAB, mask.shape, generator=torch.Generator().manual_seed(0))
    vs = ValSet(ids, mask, groups=[i // 4 for i in range(48)])
    valuer = Valuer(tiny_gpt2(), {"each": vs}, per_example=["each"], val_chunk=10)
    chunks = list(valuer.pass_chunks("each"))
    assert [tuple(c[1].shape) for c in chunks] == [(10, t)] * 4 + [(8, tail)]
    full = [i for i in range(48) if i % 4 != 3]
    assert torch.cat([c[0] for c in chunks]).tolist() == full + [i for i in range(48) if i % 4 == 3]
    for seqs, ids_, mask_ in chunks:  # each chunk's rows are its sequences' own tokens
        assert torch.equal(ids_, ids[seqs, : ids_.shape[1]]) and torch.equal(
            mask_, mask[seqs, : ids_.shape[1]]
        )
        assert int(mask[seqs, ids_.shape[1] :].sum()) == 0
    valuer.forward_backward(*ragged_batch(4, 10, seed=1))
    assert valuer.plans()["each"].sizes["val_tokens"] == 36 * t + 12 * tail + 2 * (t - tail) * 0 + 4 * (
        t - tail
    )
    plain = Valuer(tiny_gpt2(), {"each": vs}, per_example=["each"], val_chunk=10, task=NotCausal())
    assert [tuple(c[1].shape) for c in plain.pass_chunks("each")] == [(10, t)] * 4 + [(8, t)]
