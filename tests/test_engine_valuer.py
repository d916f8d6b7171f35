"""The in-loop Valuer: exact training gradients, values of the step actually taken, order 2 reuse."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_engine_helpers import one_thread, ragged_batch, rel_err, tiny_gpt2  # noqa: F401

from attribution.engine import StepValues, ValSet, Valuer, grad_dot_products, grad_norms, step_values
from attribution.engine import valuer as valuer_module
from attribution.engine.exact import per_sample_grads
from attribution.engine.task import LanguageModelingTask
from attribution.errors import UserError


class CountingTask(LanguageModelingTask):
    """Counts forward passes, to check that order 2 reuses the validation gradient at w'."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def per_sequence_loss(self, model, ids, mask):
        self.calls += 1
        return super().per_sequence_loss(model, ids, mask)


def _val():
    va, vm = ragged_batch(3, 9, seed=7)
    return va, vm, {"v": ValSet(va, vm, ["a", "b", "c"])}


def test_training_gradients_identical_to_plain_backward_with_dropout():
    model = tiny_gpt2()
    model.config.resid_pdrop = 0.1
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    model.train()
    tr, tm = ragged_batch(6, 10, seed=3)
    torch.manual_seed(5)
    loss_plain = LanguageModelingTask().per_sequence_loss(model, tr, tm).mean()
    loss_plain.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _, _, vs = _val()
    valuer = Valuer(model, vs, per_example=["v"])
    torch.manual_seed(5)
    loss = valuer.forward_backward(tr, tm)
    sv = valuer.values(0.1)
    assert abs(loss - float(loss_plain.detach())) <= 1e-12
    worst = max(rel_err(p.grad, plain[n]) for n, p in model.named_parameters())
    print(f"max rel grad diff vs plain backward: {worst:.2e}")
    assert worst <= 1e-6
    assert model.training and all(m.training for m in model.modules())  # val pass restored the modes
    assert sv.per_set["v"].dtype == np.float64 and sv.per_set["v"].shape == (6,)


@pytest.mark.parametrize("strategy,ghost_norm", [(None, False), ("ghost", False), ("ghost", True)])
def test_order1_loop_matches_step_values_and_per_example(strategy, ghost_norm, monkeypatch):
    """Values, per-example values and norms against brute force; the set's norm by both of its routes for
    ghost parameters (the summed dense gradient, or the ghost self-product of all tokens)."""
    monkeypatch.setattr(valuer_module, "ghost_norm_is_cheaper", lambda tokens, shape: ghost_norm)
    model = tiny_gpt2()
    va, vm, vs = _val()
    valuer = Valuer(model, vs, per_example=["v"], grad_norms=True, strategy=strategy)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        tr, tm = ragged_batch(5, 10, seed=40 + step)
        ref = step_values(model, tr, va, 0.05, train_mask=tm, val_mask=vm)
        dots = grad_dot_products(model, tr, va, train_mask=tm, val_mask=vm)
        norms = grad_norms(model, tr, mask=tm)
        gval = per_sample_grads(model, va, vm).sum(0)
        opt.zero_grad()
        valuer.forward_backward(tr, tm)
        sv = valuer.values(0.05)
        assert isinstance(sv, StepValues) and sv.step == step + 1
        assert valuer.after_step() is None
        opt.step()
        np.testing.assert_allclose(sv.per_set["v"], ref.numpy(), rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(sv.per_example["v"], (0.05 / 5 * dots).numpy(), rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(sv.per_example["v"].sum(1), sv.per_set["v"], rtol=1e-12)
        np.testing.assert_allclose(sv.train_grad_sq_norm, norms.numpy(), rtol=1e-9)
        assert abs(sv.val_grad_sq_norm["v"] - float(gval @ gval)) <= 1e-9 * float(gval @ gval)
    assert valuer.finish() is None


def test_grad_scale_multiplies_values():
    model = tiny_gpt2()
    _, _, vs = _val()
    tr, tm = ragged_batch(4, 10, seed=9)
    valuer = Valuer(model, vs)
    valuer.forward_backward(tr, tm)
    full = valuer.values(0.1).per_set["v"]
    valuer.forward_backward(tr, tm)
    clipped = valuer.values(0.1, grad_scale=0.25).per_set["v"]
    np.testing.assert_allclose(clipped, 0.25 * full, rtol=1e-12)


def test_order2_loop_reuses_validation_gradient_and_matches_step_values():
    model = tiny_gpt2()
    va, vm, _ = _val()
    task = CountingTask()
    valuer = Valuer(model, {"v": ValSet(va, vm)}, order=2, task=task)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(3):
        tr, tm = ragged_batch(5, 10, seed=60 + step)
        # on a copy: step_values moves and restores weights in place, which (rightly) invalidates the cache
        ref = step_values(copy.deepcopy(model), tr, va, 0.2, order=2, train_mask=tm, val_mask=vm)
        opt.zero_grad()
        calls = task.calls
        valuer.forward_backward(tr, tm)
        assert valuer.values(0.2) is None
        opt.step()
        sv = valuer.after_step()
        # one train pass + one validation pass per step (two on the first step: before and after)
        assert task.calls - calls == (3 if step == 0 else 2)
        np.testing.assert_allclose(sv.per_set["v"], ref.numpy(), rtol=1e-8, atol=1e-15)
        assert sv.order == 2
    assert valuer.finish() is None
    tr, tm = ragged_batch(5, 10, seed=99)
    valuer.forward_backward(tr, tm)
    assert valuer.values(0.2) is None
    with pytest.raises(UserError):
        valuer.forward_backward(tr, tm)  # after_step() missing
    flushed = valuer.finish()  # no step was taken: first-order values
    np.testing.assert_allclose(
        flushed.per_set["v"], step_values(model, tr, va, 0.2, train_mask=tm, val_mask=vm).numpy(), rtol=1e-9
    )


def test_optimizer_aware_loop_matches_step_values_and_leaves_optimizer_alone():
    model = tiny_gpt2()
    va, vm, vs = _val()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    valuer = Valuer(model, vs, optimizer_aware=True)
    with pytest.raises(UserError):
        Valuer(model, vs, optimizer_aware=True, strategy="ghost").forward_backward(
            *ragged_batch(2, 5, seed=1)
        )
    for step in range(3):
        tr, tm = ragged_batch(5, 10, seed=80 + step)
        ref = step_values(model, tr, va, 1e-3, optimizer=opt, train_mask=tm, val_mask=vm)
        opt.zero_grad()
        valuer.forward_backward(tr, tm)
        with pytest.raises(UserError):
            valuer.values(1e-3)  # optimizer missing
        opt.zero_grad()
        valuer.forward_backward(tr, tm)
        state = {k: v.clone() for k, v in opt.state_dict()["state"].get(0, {}).items()}
        sv = valuer.values(1e-3, optimizer=opt)
        assert all(torch.equal(v, opt.state_dict()["state"][0][k]) for k, v in state.items())
        opt.step()
        np.testing.assert_allclose(sv.per_set["v"], ref.numpy(), rtol=1e-7, atol=1e-15)


def test_values_needs_forward_backward_and_names_must_fit():
    model = tiny_gpt2()
    _, _, vs = _val()
    with pytest.raises(UserError):
        Valuer(model, vs).values(0.1)
    with pytest.raises(UserError):
        ValSet(torch.zeros(2, 4, dtype=torch.long), names=["only-one"])
    with pytest.raises(UserError):
        Valuer(model, vs, per_example=["nope"])


def test_bf16_autocast_on_cpu_is_close_to_fp32():
    model = tiny_gpt2(dtype=torch.float32, n_embd=32)
    _, _, vs = _val()
    tr, tm = ragged_batch(4, 10, seed=13)
    ref = Valuer(model, vs)
    ref.forward_backward(tr, tm)
    want = ref.values(0.1).per_set["v"]
    ref.close()
    model.zero_grad(set_to_none=True)
    low = Valuer(model, vs, autocast_dtype=torch.bfloat16)
    low.forward_backward(tr, tm)
    got = low.values(0.1).per_set["v"]
    assert got.dtype == np.float64
    assert np.corrcoef(got, want)[0, 1] > 0.95


def test_ddp_wrapped_model_single_process_gloo(tmp_path):
    """forward_backward on the DDP wrapper (all-reduce runs), validation passes on the inner module."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_gpt2(dtype=torch.float32)
    va, vm, vs = _val()
    tr, tm = ragged_batch(4, 10, seed=17)
    ref = step_values(copy.deepcopy(model), tr, va, 0.1, train_mask=tm, val_mask=vm)
    plain = copy.deepcopy(model)
    LanguageModelingTask().per_sequence_loss(plain, tr, tm).mean().backward()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        valuer = Valuer(ddp, vs)
        valuer.forward_backward(tr, tm)
        sv = valuer.values(0.1)
        for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
            assert rel_err(p.grad, q.grad) <= 1e-6, name
        # float32 sums in another order: tolerance from the values' scale, not per element
        want = ref.numpy()
        np.testing.assert_allclose(sv.per_set["v"], want, rtol=0, atol=1e-4 * np.abs(want).max())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", [None, "materialize", "project", "ghost", "kronecker"])
def test_sets_scored_together_equal_each_set_scored_alone_and_brute_force(strategy):
    """`score_sets` stacks the sets planned alike for a parameter: same numbers as `score` per set."""
    import dataclasses

    from attribution.engine.scoring import score, score_sets

    model = tiny_gpt2()
    val = {name: ragged_batch(m, 8, seed=60 + m) for name, m in (("whole", 3), ("few", 2), ("more", 4))}
    sets = {name: ValSet(ids, mask) for name, (ids, mask) in val.items()}
    valuer = Valuer(model, sets, per_example=["few", "more"], strategy=strategy)
    tr, tm = ragged_batch(5, 10, seed=71)
    valuer.forward_backward(tr, tm)
    train = valuer.train_capture
    plans = dict(valuer.plans())
    pid = next(p for p, lp in plans["few"].layers.items() if lp.name.endswith("c_fc.weight"))
    if strategy is None:  # one set planned differently for one parameter: the mixed path is exercised too
        other = "ghost" if plans["few"].layers[pid].strategy != "ghost" else "project"
        plans["few"].layers[pid] = dataclasses.replace(plans["few"].layers[pid], strategy=other)
    sides = {name: valuer._val_side(name)[0] for name in sets}
    together = score_sets(train, sides, plans, valuer.shapes)
    for name, side in sides.items():
        alone = score(train, side, plans[name], valuer.shapes)
        np.testing.assert_allclose(together[name].numpy(), alone.numpy(), rtol=1e-12, atol=1e-300)
        if strategy != "kronecker":  # the exact strategies: brute-force per-sample gradients
            ids, mask = val[name]
            want = (per_sample_grads(model, tr, tm) @ per_sample_grads(model, ids, mask).t()).double()
            want = want if name != "whole" else want.sum(1, keepdim=True)
            np.testing.assert_allclose(
                together[name].numpy(), want.numpy(), rtol=1e-9, atol=1e-12 * float(want.abs().max())
            )
    sv = valuer.values(0.05)
    for name in sets:
        got = sv.per_example.get(name, sv.per_set[name][:, None])
        np.testing.assert_allclose(got, 0.05 / 5 * together[name].numpy(), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("aware,strategy", [(True, None), (False, "ghost"), (False, "project")])
def test_validation_in_chunks_gives_the_unchunked_values_norms_and_losses(aware, strategy):
    """The validation pass runs in chunks of sequences (memory); the sides are linear, so every value,
    norm and loss is the one pass over all sequences gives, at both orders' paths (float64)."""
    va, vm = ragged_batch(7, 9, seed=11)
    sets = {"each": ValSet(va, vm), "whole": ValSet(va[:5], vm[:5])}
    runs = []
    for chunk in (None, 3, 1):
        model = tiny_gpt2()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        valuer = Valuer(
            model,
            sets,
            order=2,
            per_example=["each"],
            optimizer_aware=aware,
            strategy=strategy,
            grad_norms=True,
            val_chunk=chunk,
        )
        out = []
        for step in range(3):
            valuer.forward_backward(*ragged_batch(4, 10, seed=40 + step))
            assert valuer.values(1e-2, optimizer=opt if aware else None) is None
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(valuer.after_step())
        runs.append(out)
    for chunked in runs[1:]:
        for ref, sv in zip(runs[0], chunked, strict=True):
            np.testing.assert_allclose(sv.per_example["each"], ref.per_example["each"], rtol=1e-10, atol=0)
            for name in sets:
                np.testing.assert_allclose(sv.per_set[name], ref.per_set[name], rtol=1e-10, atol=0)
                assert sv.val_loss[name] == pytest.approx(ref.val_loss[name], rel=1e-12)
                assert sv.val_grad_sq_norm[name] == pytest.approx(ref.val_grad_sq_norm[name], rel=1e-10)
            np.testing.assert_allclose(
                sv.val_example_sq_norm["each"], ref.val_example_sq_norm["each"], rtol=1e-10
            )
    assert np.abs(runs[0][-1].per_example["each"]).max() > 0


@pytest.mark.parametrize("order,aware", [(1, False), (1, True), (2, False), (2, True)])
def test_a_dead_sides_buffers_are_reused_with_the_same_values(order, aware, monkeypatch):
    """A per-example side built in chunks is written into the buffers of the side that died before it
    (memory, see `Valuer._buffer`); the values are the ones fresh buffers give, to the bit."""
    va, vm = ragged_batch(7, 9, seed=11)
    build = Valuer._buffer
    taken: list[bool] = []

    def watched(self, name, pid, g, rows):
        taken.append((name, pid) in self._spare)
        return build(self, name, pid, g, rows)

    monkeypatch.setattr(Valuer, "_buffer", watched)
    runs = []
    for recycle in (False, True):
        taken.clear()
        model = tiny_gpt2()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        valuer = Valuer(
            model,
            {"each": ValSet(va, vm)},
            order=order,
            per_example=["each"],
            optimizer_aware=aware,
            strategy="materialize",
            val_chunk=3,
        )
        if not recycle:
            valuer._recycle = lambda name, side: None
        out = []
        for step in range(4):
            valuer.forward_backward(*ragged_batch(4, 10, seed=40 + step))
            first = valuer.values(1e-2, optimizer=opt if aware else None)
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(first if order == 1 else valuer.after_step())
        runs.append(out)
        assert any(taken) == recycle  # the recycled run did write into dead buffers
    for fresh, recycled in zip(*runs, strict=True):
        np.testing.assert_array_equal(fresh.per_example["each"], recycled.per_example["each"])
    assert np.abs(runs[0][-1].per_example["each"]).max() > 0
