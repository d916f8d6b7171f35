"""The checkpoint similarity (TrackStar's recipe, exact): brute force on a tiny model in float64, and on
real (tiny) runs in tests/test_views_run.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.engine.rules import trainable_params
from attribution.engine.task import LanguageModelingTask
from attribution.workflows import checkpoint_similarity as cs
from tests.hf_fixtures import VOCAB, T, tiny_model


def _items(seed: int, n_items: int, seqs_per_item: tuple[int, ...]):
    rng = np.random.default_rng(seed)
    owner = np.concatenate([np.full(k, i) for i, k in enumerate(seqs_per_item)])
    rng.shuffle(owner)  # an item's sequences need not be adjacent
    ids = rng.integers(0, VOCAB, (len(owner), T))
    mask = np.ones_like(ids)
    mask[0, 5:] = 0
    return cs.Sequences(ids, mask, owner, n_items)


def _states(model, n: int):
    """`n` weight states (perturbed copies) and a positive Adam-like K for each but the first."""
    g = torch.Generator().manual_seed(7)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    states, ks = [], []
    for i in range(n):
        states.append(
            {k: v + 0.05 * i * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in base.items()}
        )
        ks.append(
            None
            if i == 0
            else {
                pid: torch.rand(p.shape, generator=g, dtype=p.dtype) * 3 + 0.1
                for pid, (_, p) in trainable_params(model).items()
            }
        )
    return states, ks


def _brute(model, states, ks, texts, docs, power):
    """Independent route: each item's gradient by `torch.autograd.grad` of all its sequences at once."""
    task, params = LanguageModelingTask(), trainable_params(model)
    ks = [ks[i] if ks[i] is not None else next(k for k in ks[i:] if k is not None) for i in range(len(ks))]

    def vec(seqs, item, k):
        r = seqs.rows(item)
        loss = task.per_sequence_loss(
            model, torch.from_numpy(seqs.ids[r]), torch.from_numpy(seqs.mask[r])
        ).sum()
        grads = torch.autograd.grad(loss, [p for _, p in params.values()], allow_unused=True)
        parts = [
            (torch.zeros_like(p) if gr is None else gr) * k[pid] ** (power / 2)
            for (pid, (_, p)), gr in zip(params.items(), grads, strict=True)
        ]
        return torch.cat([x.reshape(-1) for x in parts])

    out = np.zeros((texts.n_items, docs.n_items))
    model.eval()
    for state, k in zip(states, ks, strict=True):
        model.load_state_dict(state)
        for j in range(docs.n_items):
            d = vec(docs, j, k)
            for i in range(texts.n_items):
                t = vec(texts, i, k)
                out[i, j] += float(t @ d / (t.norm() * d.norm()))
    return out / len(states)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_cosines_match_brute_force_per_item_gradients(power, monkeypatch):
    model = tiny_model()
    states, ks = _states(model, 3)
    texts, docs = _items(1, 3, (2, 1, 3)), _items(2, 5, (1, 4, 2, 1, 3))
    monkeypatch.setattr(cs, "SEQ_CHUNK", 2)  # an item's sequences over several backward passes
    monkeypatch.setattr(cs, "DOT_SLICE", 97)  # the scores summed over slices of the parameters
    monkeypatch.setattr(cs, "DOC_BLOCK_BYTES", 2 * 8 * sum(p.numel() for p in model.parameters()))

    def loader(i):
        def load():
            model.load_state_dict(states[i])
            return ks[i]

        return load

    got = cs.cosines(
        model, LanguageModelingTask(), [loader(i) for i in range(3)], texts, docs, powers=(power, 0.0)
    )
    want = _brute(model, states, ks, texts, docs, power)
    assert got.shape == (2, 3, 5) and np.abs(want).max() > 0.01 and np.abs(got).max() <= 1.0 + 1e-12
    np.testing.assert_allclose(got[0], want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got[1], _brute(model, states, ks, texts, docs, 0.0), rtol=1e-10, atol=1e-12)
    # the power matters (it would not if K were ignored)
    other = _brute(model, states, ks, texts, docs, 3.0 - power)
    assert np.abs(other - want).max() > 1e-3


def test_texts_are_scored_in_groups_as_one(monkeypatch):
    model = tiny_model()
    states, ks = _states(model, 2)
    texts, docs = _items(3, 4, (1, 2, 1, 2)), _items(4, 3, (2, 1, 1))

    def loaders():
        def make(i):
            def load():
                model.load_state_dict(states[i])
                return ks[i]

            return load

        return [make(i) for i in range(2)]

    whole = cs.cosines(model, LanguageModelingTask(), loaders(), texts, docs)
    monkeypatch.setattr(
        cs, "MAX_TEXT_BYTES", 2 * 8 * sum(p.numel() for p in model.parameters())
    )  # one at a time
    np.testing.assert_allclose(
        cs.cosines(model, LanguageModelingTask(), loaders(), texts, docs), whole, rtol=1e-12
    )


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_item_gradients_match_autograd_per_item(chunk, monkeypatch):
    """`gradients` (one capture per chunk of many items' sequences, added by item into the rows) against
    `torch.autograd.grad` of each item's summed loss alone, float64: items whose sequences are shuffled
    and split over chunks, chunks cut to their longest sequence (every sequence here is padded, so every
    chunk is cut), and an item with no label token (one token: a zero row)."""
    model = tiny_model()
    task, params = LanguageModelingTask(), trainable_params(model)
    seqs = _items(5, 4, (2, 3, 1, 2))
    rng = np.random.default_rng(9)
    seqs.mask[:] = (np.arange(T) < rng.integers(2, T - 3, (len(seqs.mask), 1))).astype(np.int64)
    lone = seqs.rows(2)[0]
    seqs.mask[lone] = 0
    seqs.mask[lone, 0] = 1  # item 2's only sequence: one token, nothing to predict
    monkeypatch.setattr(cs, "SEQ_CHUNK", chunk)
    got = cs.gradients(model, task, seqs, params)

    model.eval()
    for item in range(seqs.n_items):
        r = seqs.rows(item)
        loss = task.per_sequence_loss(model, torch.from_numpy(seqs.ids[r]), torch.from_numpy(seqs.mask[r]))
        grads = torch.autograd.grad(loss.sum(), [p for _, p in params.values()], allow_unused=True)
        want = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).reshape(-1)
                for (_, p), g in zip(params.values(), grads, strict=True)
            ]
        )
        scale = float(want.abs().max())
        if item == 2:
            assert scale == 0 and float(got[item].abs().max()) == 0
        else:
            assert scale > 0
            torch.testing.assert_close(got[item], want, rtol=1e-10, atol=1e-12 * scale)
    assert all(p.grad is None for _, p in params.values())  # the model's own gradients are left alone


def test_scores_are_summed_in_float64_over_slices():
    """The cosine's dot product over millions of float32 coordinates with Adam's range of scales: within
    a bound derived from float32's epsilon of float64's, where one float32 GEMM over all of them lost
    1e-3 of a cosine on a real run, and slices of 64K reached 0.9 of this bound (docs/benchmarks.md,
    "Session 22")."""
    g = torch.Generator().manual_seed(3)
    n = 1 << 21
    scale = 10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 8 - 4)  # 1e-4 .. 1e4, as K^(1/2) x g
    a = torch.randn(3, n, generator=g, dtype=torch.float64) * scale
    b = a[:2] + 0.8 * torch.randn(2, n, generator=g, dtype=torch.float64) * scale
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    want = a @ b.T
    got = cs._dots(a.float(), b.float())
    assert got.dtype == torch.float64 and want.abs().max() > 0.5
    # each slice's float32 sum: an error of a few epsilons of its terms' magnitude; summed in float64
    bound = 16 * torch.finfo(torch.float32).eps * (a.abs() @ b.abs().T)
    assert ((got - want).abs() <= bound).all(), float(((got - want).abs() / bound).max())


def test_unit_rows_are_normalized_in_float64():
    """A side's rows are divided by their norm summed in float64: torch's float32 norm of millions of
    coordinates over Adam's range of scales was off by 1e-4, and every cosine with it."""
    g = torch.Generator().manual_seed(5)
    n = 1 << 22
    x = torch.randn(3, n, generator=g, dtype=torch.float64) * 10.0 ** (
        torch.rand(n, generator=g, dtype=torch.float64) * 8 - 4
    )
    x[1] = 0  # a zero row stays zero
    got = cs._unit(x.float()).double().norm(dim=1)
    # each coordinate rounded once to float32 (and the norm once): a few epsilons
    assert (got[[0, 2]] - 1).abs().max() <= 4 * torch.finfo(torch.float32).eps
    assert got[1] == 0
