"""In-run gradient sketches: `R_s` of the captured factors is `R_s` of the per-sample gradient, unbiased, and
each document accumulates its sequences' weighted sketches over steps and segments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.engine.capture import Capturer
from attribution.engine.rules import canonical_shape, trainable_params
from attribution.engine.task import LanguageModelingTask
from attribution.engine.valuer import ValSet, Valuer
from attribution.train.distributed import DistInfo
from attribution.train.sketch import (
    BALANCED,
    KINDS,
    InRunSketch,
    KroneckerProjection,
    Projection,
    TensorProjection,
    balance,
    balanced_claim_side,
    make_projection,
    model_params,
    prefix,
    projection_from_meta,
    segment_of,
    segments,
)
from attribution.train.step import ValuedStep
from tests.test_engine_helpers import one_thread, ragged_batch, tiny_gpt2  # noqa: F401 (fixture)

SIDE = 8  # below the tiny model's widths (16, 31, 48, 64): both projected and exact sides are exercised
WIDTH = 40  # a tensor sketch narrower than most parameters: hash collisions are exercised


def _per_sample_grads(model, ids, mask) -> list[dict[str, torch.Tensor]]:
    """Brute force: autograd of each sequence's own loss, in each parameter's canonical shape."""
    task = LanguageModelingTask()
    params = trainable_params(model)
    out = []
    for i in range(len(ids)):
        model.zero_grad()
        task.per_sequence_loss(model, ids[i : i + 1], mask[i : i + 1]).sum().backward()
        out.append({name: p.grad.detach().clone().reshape(canonical_shape(p)) for name, p in params.values()})
    model.zero_grad()
    return out


def _projection(model, dim: int, seed: int, kind: str = "tensor") -> Projection:
    return make_projection(model_params(model)[0], dim, seed, kind, **_size(kind))


def _size(kind: str) -> dict:
    return {"side": SIDE} if kind == "kronecker" else {"width": WIDTH}


@pytest.mark.parametrize("kind", KINDS)
def test_sketch_of_the_factors_is_the_projection_of_the_per_sample_gradient(kind):
    """From the captured factors (tensor: circular convolution of the factors' count sketches) equals the
    first stage applied to each dense per-sample gradient (tensor: entry (i, j) into bucket h0(i) + h1(j))."""
    model = tiny_gpt2()
    ids, mask = ragged_batch(3, 10, seed=1)
    proj = _projection(model, 24, seed=5, kind=kind)
    assert max(p0 * p1 for p0, p1 in proj.params.values()) > proj.width or kind == "kronecker"
    if kind == "kronecker":
        assert any(b != tuple(s) for b, s in zip(proj.blocks.values(), proj.params.values(), strict=True))
    _, cap = Capturer(model).train(lambda: LanguageModelingTask().per_sequence_loss(model, ids, mask))
    names = model_params(model)[1]
    for segment in (0, 3):
        got = proj.mix(proj.first_stage(cap, names), segment)
        want = torch.stack([proj.apply_dense(g, segment) for g in _per_sample_grads(model, ids, mask)])
        assert got.dtype == torch.float64 and got.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))


def _random_k(model, seed: int) -> dict[int, torch.Tensor]:
    """A positive, heavy-tailed, param-shaped K (as Adam's is: 1 / (sqrt(v) + eps) over many scales)."""
    g = torch.Generator().manual_seed(seed)
    return {
        pid: torch.exp(3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        for pid, (_, p) in trainable_params(model).items()
    }


@pytest.mark.parametrize("kind", KINDS)
def test_the_balanced_document_side_stays_factored(kind):
    """`S (F * g)` from the captured factors, with F = a b^T = balance(K), against the dense
    per-sample gradient multiplied by F (embedding rows, dense rows and 1-column biases alike)."""
    model = tiny_gpt2()
    ids, mask = ragged_batch(3, 10, seed=1)
    proj = _projection(model, 24, seed=5, kind=kind)
    _, cap = Capturer(model).train(lambda: LanguageModelingTask().per_sequence_loss(model, ids, mask))
    names = model_params(model)[1]
    k = _random_k(model, 0)
    scales = {names[pid]: balance(kk.reshape(proj.params[names[pid]])) for pid, kk in k.items()}
    got = proj.mix(proj.first_stage(cap, names, scales), 1)
    want = torch.stack(
        [
            proj.apply_dense({n: g[n] * torch.outer(*scales[n]) for n in g}, 1)
            for g in _per_sample_grads(model, ids, mask)
        ]
    )
    assert got.abs().max() > 0 and not torch.allclose(got, proj.mix(proj.first_stage(cap, names), 1))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))


def test_balance_splits_k_exactly_and_fits_a_rank_one_k():
    model = tiny_gpt2()
    params = {pid: p for pid, (_, p) in trainable_params(model).items()}
    k = _random_k(model, 1)
    claim = balanced_claim_side(k, params)
    for pid, kk in k.items():
        a, b = balance(kk.reshape(canonical_shape(params[pid])))
        f = torch.outer(a, b).reshape(kk.shape)
        torch.testing.assert_close(claim[pid] * f, kk, rtol=1e-12, atol=0)  # K / F times F is K
    a0 = torch.rand(7, dtype=torch.float64) + 0.1
    b0 = torch.rand(5, dtype=torch.float64) + 0.1
    a, b = balance(torch.outer(a0, b0) ** 2)  # sqrt of a rank-1 K is found exactly
    torch.testing.assert_close(torch.outer(a, b), torch.outer(a0, b0), rtol=1e-12, atol=0)
    a, b = balance(torch.zeros(3, 2))  # nothing to balance: F = 1
    assert torch.equal(torch.outer(a, b), torch.ones(3, 2, dtype=torch.float64))


@pytest.mark.parametrize("kind", KINDS)
def test_sketch_inner_products_are_unbiased(kind):
    """Mean over independent seeds of `<R g, R h>` is `<g, h>` within 4 standard errors; one seed is not exact."""
    model = tiny_gpt2()
    ids, mask = ragged_batch(2, 8, seed=2)
    g, h = _per_sample_grads(model, ids, mask)
    exact = sum(float((g[n] * h[n]).sum()) for n in g)
    est = []
    for seed in range(300):
        proj = _projection(model, 16, seed, kind)
        est.append(float(proj.apply_dense(g, seed % 3) @ proj.apply_dense(h, seed % 3)))
    est = np.asarray(est)
    se = est.std(ddof=1) / np.sqrt(len(est))
    assert se > 1e-6 * abs(exact)
    assert abs(est.mean() - exact) < 4 * se


def test_segments_follow_the_replay_chain():
    assert segments(2, 5) == [(0, 2), (2, 4), (4, 5)]
    assert segments(0, 5) == [(0, 5)]
    segs = segments(2, 5)
    assert [segment_of(segs, t) for t in range(1, 6)] == [0, 0, 1, 1, 2]


def test_documents_accumulate_their_sequences_weighted_sketches_over_steps():
    """Fed through the ValuedStep's observer like the loop: lr * clip * (1/n) * R_s g_i, summed per document."""
    model = tiny_gpt2()
    val_ids, val_mask = ragged_batch(2, 8, seed=9)
    valuer = Valuer(model, {"v": ValSet(val_ids, val_mask)})
    seq_doc = np.array([0, 0, 1, 2, 2, 1])  # six sequences, three documents
    segs = segments(2, 4)
    sketch = InRunSketch(model, 12, seed=4, segs=segs, store_row_of_seq=seq_doc, doc_ids=["a", "b", "c"])
    sketch.projection = TensorProjection(sketch.projection.params, 12, 4, width=WIDTH)
    stepper = ValuedStep(model, valuer, DistInfo(), max_grad_norm=None)
    sketch.attach(stepper)
    ids_all, mask_all = ragged_batch(6, 10, seed=3)
    want = np.zeros((3, 12))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step, (batch, lr, clip) in enumerate(
        [([0, 3], 0.1, 1.0), ([1, 2], 0.2, 0.5), ([4, 5], 0.3, 0.7), ([3, 0], 0.4, 1.0)], start=1
    ):
        b = np.asarray(batch)
        ids, mask = ids_all[b], mask_all[b]
        grads = _per_sample_grads(model, ids, mask)
        for i, g in zip(b, grads, strict=True):
            want[seq_doc[i]] += (
                lr * clip / len(b) * sketch.projection.apply_dense(g, segment_of(segs, step)).numpy()
            )
        valuer.forward_backward(ids, mask)
        stepper.before_optimizer_step(lr, clip, opt)
        sketch.add(step, b)
        opt.step()
        opt.zero_grad()
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(sketch.acc, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    with pytest.raises(RuntimeError, match="not observed"):
        sketch.add(5, np.array([0]))


# side 5: block widths that are not multiples of the generator's chunk
@pytest.mark.parametrize("kind, size", [("kronecker", SIDE), ("kronecker", 5), ("tensor", WIDTH)])
def test_a_smaller_dimension_is_a_rescaled_prefix_of_a_larger_one(kind, size):
    """`prefix` gives the sketch a run of the smaller `--sketch-dim` writes (the fidelity benchmark relies on it)."""
    model = tiny_gpt2()
    ids, mask = ragged_batch(2, 8, seed=4)
    shapes = model_params(model)[0]
    key = {"side": size} if kind == "kronecker" else {"width": size}
    big, small = (make_projection(shapes, d, 7, kind, **key) for d in (96, 24))
    for g in _per_sample_grads(model, ids, mask):
        for segment in (0, 2):
            want = small.apply_dense(g, segment).numpy()
            got = prefix(big.apply_dense(g, segment).numpy()[None], 24)[0]
            assert np.abs(want).max() > 0
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13 * np.abs(want).max())
    with pytest.raises(ValueError, match="must be in 1..96"):
        prefix(np.zeros((1, 96)), 97)


def test_optimizer_aware_steps_weight_each_document_with_the_steps_balanced_adam_k():
    """The loop's feed with an optimizer-aware valuer and AdamW: lr * clip / n * R_s (balance(K_t) * g_i),
    with K_t the Valuer's own preconditioner of step t (the values' K, computed once and shared)."""
    model = tiny_gpt2()
    val_ids, val_mask = ragged_batch(2, 8, seed=9)
    valuer = Valuer(model, {"v": ValSet(val_ids, val_mask)}, optimizer_aware=True)
    seq_doc = np.array([0, 1, 1, 0])
    segs = segments(2, 3)
    sketch = InRunSketch(
        model, 12, seed=4, segs=segs, store_row_of_seq=seq_doc, doc_ids=["a", "b"], preconditioner=BALANCED
    )
    sketch.projection = TensorProjection(sketch.projection.params, 12, 4, width=WIDTH)
    stepper = ValuedStep(model, valuer, DistInfo(), max_grad_norm=None)
    sketch.attach(stepper)
    ids_all, mask_all = ragged_batch(4, 10, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    names, params = model_params(model)[1], trainable_params(model)
    want, plain = np.zeros((2, 12)), np.zeros((2, 12))
    for step, (batch, lr) in enumerate([([0, 1], 0.01), ([2, 3], 0.02), ([1, 0], 0.03)], start=1):
        b = np.asarray(batch)
        grads = _per_sample_grads(model, ids_all[b], mask_all[b])
        valuer.forward_backward(ids_all[b], mask_all[b])
        k = valuer.preconditioner(opt)
        assert k is valuer.preconditioner(opt)  # one K per step
        f = {
            names[pid]: torch.outer(*balance(kk.reshape(canonical_shape(params[pid][1]))))
            for pid, kk in k.items()
        }
        seg = segment_of(segs, step)
        for i, g in zip(b, grads, strict=True):
            want[seq_doc[i]] += (
                lr / len(b) * sketch.projection.apply_dense({n: g[n] * f[n] for n in g}, seg).numpy()
            )
            plain[seq_doc[i]] += lr / len(b) * sketch.projection.apply_dense(g, seg).numpy()
        stepper.before_optimizer_step(lr, 1.0, opt)
        sketch.add(step, b)
        opt.step()
        opt.zero_grad()
    assert not np.allclose(want, plain, rtol=0.1)
    np.testing.assert_allclose(sketch.acc, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())


def test_a_meta_without_kind_is_the_kronecker_sketch_of_older_runs():
    """Runs made before the tensor sketch wrote no `kind`: their meta gives back the same Kronecker matrices."""
    model = tiny_gpt2()
    shapes = model_params(model)[0]
    old = KroneckerProjection(shapes, 24, 3, side=SIDE)
    meta = {k: v for k, v in old.meta().items() if k not in ("kind", "mix")}
    again = projection_from_meta(meta)
    assert isinstance(again, KroneckerProjection) and again.side == SIDE and again.mix_kind == "segment"
    g = _per_sample_grads(model, *ragged_batch(1, 6, seed=8))[0]
    assert torch.equal(again.apply_dense(g, 2), old.apply_dense(g, 2))
    new = projection_from_meta(_projection(model, 24, 3).meta())
    assert isinstance(new, TensorProjection) and new.width == WIDTH
    with pytest.raises(ValueError, match="sketch kind 'gauss'"):
        make_projection(shapes, 24, 3, "gauss")


def test_the_tensor_sketch_estimates_inner_products_better_than_kronecker_blocks_of_its_width():
    """What the tensor sketch is for: at the same first-stage width, its inner products of
    low-rank per-sample gradients err less than Kronecker blocks' (mean squared error over seeds)."""
    model = tiny_gpt2()
    g, h = _per_sample_grads(model, *ragged_batch(2, 8, seed=2))
    exact = sum(float((g[n] * h[n]).sum()) for n in g)
    shapes = model_params(model)[0]
    kron = [KroneckerProjection(shapes, 8, s, side=SIDE) for s in range(60)]
    width = kron[0].width
    tensor = [TensorProjection(shapes, 8, s, width=width) for s in range(60)]

    def mse(projs):
        return np.mean([(float(p.first_stage_dense(g) @ p.first_stage_dense(h)) - exact) ** 2 for p in projs])

    assert mse(tensor) < mse(kron)


def test_a_shared_mix_is_one_matrix_for_every_segment():
    """`mix = shared`: every segment is mixed by segment 0's draw; `segment`: a different draw per segment."""
    shapes = model_params(tiny_gpt2())[0]
    shared = TensorProjection(shapes, 12, 3, width=WIDTH, mix="shared")
    apart = TensorProjection(shapes, 12, 3, width=WIDTH, mix="segment")
    dev, dt = torch.device("cpu"), torch.float64
    assert torch.equal(shared.mixer(3, dev, dt), shared.mixer(0, dev, dt))
    assert torch.equal(shared.mixer(3, dev, dt), apart.mixer(0, dev, dt))
    assert not torch.equal(apart.mixer(3, dev, dt), apart.mixer(0, dev, dt))
    assert projection_from_meta(shared.meta()).mix_kind == "shared"
    with pytest.raises(ValueError, match="sketch mix 'both'"):
        TensorProjection(shapes, 12, 3, mix="both")


def test_a_checkpointed_sketch_is_restored_only_under_the_same_projection():
    """Resuming must not add steps of one projection to an accumulator made with another (or by older code
    that recorded none): the loop then writes no sketch rather than a wrong one."""
    model = tiny_gpt2()
    args = dict(dim=12, seed=4, segs=segments(2, 4), store_row_of_seq=np.array([0, 1]), doc_ids=["a", "b"])
    saved = InRunSketch(model, **args)
    saved.acc[:] = 1.5
    arrays = saved.state_arrays()
    same = InRunSketch(model, **args)
    assert same.load_state_arrays(arrays) and (same.acc == 1.5).all()
    for other in ({"kind": "kronecker"}, {"mix": "segment"}, {"width": 64}):
        assert not InRunSketch(model, **args, **other).load_state_arrays(arrays), other
    assert not InRunSketch(model, **args).load_state_arrays({"sketch.acc": arrays["sketch.acc"]})
