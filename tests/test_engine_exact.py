"""grad_dot_products and grad_norms against brute-force per-sample gradients (loop over sequences)."""

from __future__ import annotations

import pytest
import torch
from test_engine_helpers import one_thread, ragged_batch, rel_err, tiny_gpt2  # noqa: F401
from torch import nn

from attribution.engine import UnsupportedModuleError, grad_dot_products, grad_norms, plan_layers
from attribution.engine.exact import brute_grad_dot_products, per_sample_grads
from attribution.errors import UserError

STRATEGIES = [None, "ghost", "project", "materialize"]


@pytest.fixture(scope="module")
def batches():
    tr, tm = ragged_batch(5, 12, seed=1)
    va, vm = ragged_batch(3, 10, seed=2)
    return tr, tm, va, vm


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_grad_dot_products_match_brute_force_every_strategy(batches, dtype, tol):
    tr, tm, va, vm = batches
    model = tiny_gpt2(dtype=dtype)
    assert model.lm_head.weight is model.transformer.wte.weight
    ref = brute_grad_dot_products(tiny_gpt2(dtype=torch.float64), tr, va, train_mask=tm, val_mask=vm)
    for strategy in STRATEGIES:
        got = grad_dot_products(model, tr, va, train_mask=tm, val_mask=vm, strategy=strategy)
        assert got.shape == (5, 3) and got.dtype == torch.float64
        err = rel_err(got, ref)
        print(f"{dtype} strategy={strategy}: max rel err {err:.2e}")
        assert err <= tol, (strategy, err)


def test_tied_cross_terms_are_needed(batches):
    """Dropping the embedding/head cross terms would be visibly wrong: the test can fail."""
    tr, tm, va, vm = batches
    model = tiny_gpt2()
    ref = brute_grad_dot_products(model, tr, va, train_mask=tm, val_mask=vm)
    # untie by hand: same values, separate parameters -> the sum over parameters loses the cross terms
    untied = tiny_gpt2(tied=False)
    untied.load_state_dict(model.state_dict())
    untied.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    got = grad_dot_products(untied, tr, va, train_mask=tm, val_mask=vm)
    assert rel_err(got, ref) > 1e-3


def test_untied_head_and_mixed_strategies(batches):
    tr, tm, va, vm = batches
    model = tiny_gpt2(tied=False, seed=3)
    ref = brute_grad_dot_products(model, tr, va, train_mask=tm, val_mask=vm)
    mixed = {"transformer.wte": "materialize", "lm_head": "ghost", "transformer.h.0": "project", "*": "ghost"}
    got = grad_dot_products(model, tr, va, train_mask=tm, val_mask=vm, strategy=mixed)
    assert rel_err(got, ref) <= 1e-6


class TinyLM(nn.Module):
    """A non-HF causal LM built from nn.Embedding, nn.LayerNorm and nn.Linear (untied head)."""

    def __init__(self, vocab: int = 23, d: int = 12):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.hidden = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        x = self.norm(self.emb(input_ids))
        x = x + torch.tanh(self.hidden(x)).cumsum(1) / 4  # mixes tokens causally
        return self.head(x)


def test_generic_modules_linear_embedding_layernorm():
    torch.manual_seed(0)
    model = TinyLM().double()
    tr, tm = ragged_batch(4, 9, seed=5, vocab=23)
    va, vm = ragged_batch(3, 7, seed=6, vocab=23)
    ref = brute_grad_dot_products(model, tr, va, train_mask=tm, val_mask=vm)
    for strategy in STRATEGIES:
        assert (
            rel_err(grad_dot_products(model, tr, va, train_mask=tm, val_mask=vm, strategy=strategy), ref)
            <= 1e-6
        )


def test_unsupported_trainable_module_raises_naming_it():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.gate = nn.Parameter(torch.ones(4))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Scaled()

    with pytest.raises(UnsupportedModuleError, match=r"block .*Scaled.*block\.gate"):
        grad_dot_products(Model(), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_grad_norms_match_brute_force(batches):
    tr, tm, _, _ = batches
    model = tiny_gpt2()
    g = per_sample_grads(model, tr, tm)
    ref = (g * g).sum(1)
    got = grad_norms(model, tr, mask=tm)
    assert rel_err(got, ref) <= 1e-6


def test_model_parameters_and_grads_untouched(batches):
    tr, tm, va, vm = batches
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    grad_dot_products(model, tr, va, train_mask=tm, val_mask=vm)
    grad_norms(model, tr, mask=tm)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.all(p.grad == 7.0) for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed


def test_plan_is_inspectable_and_overridable(batches):
    tr, tm, va, vm = batches
    model = tiny_gpt2()
    plan = plan_layers(model, tr, va, train_mask=tm, val_mask=vm)
    text = str(plan)
    assert "transformer.wte.weight" in text and "2 uses" in text  # the tied parameter, listed once
    assert len(plan.layers) == len({id(p) for p in model.parameters()})
    forced = plan_layers(model, tr, va, strategy={"transformer.h.1.mlp": "materialize"})
    picked = {lp.name: lp.strategy for lp in forced.layers.values()}
    assert picked["transformer.h.1.mlp.c_fc.weight"] == "materialize"
    assert plan_layers(model, tr, va, optimizer_aware=True).counts().get("ghost", 0) == 0


def test_kronecker_projection_is_exact_when_wide_and_approximate_when_narrow(batches, monkeypatch):
    import attribution.engine.strategies.kronecker as kronecker

    tr, tm, va, vm = batches
    model = tiny_gpt2()
    ref = brute_grad_dot_products(model, tr, va, train_mask=tm, val_mask=vm)
    monkeypatch.setattr(kronecker, "KRON_DIM", 64)  # >= every side of every parameter: identity projections
    assert (
        rel_err(grad_dot_products(model, tr, va, train_mask=tm, val_mask=vm, strategy="kronecker"), ref)
        <= 1e-6
    )
    monkeypatch.setattr(kronecker, "KRON_DIM", 24)
    got = grad_dot_products(model, tr, va, train_mask=tm, val_mask=vm, strategy="kronecker")
    assert rel_err(got, ref) > 1e-6  # really projected
    assert torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1] > 0.5
    with pytest.raises(UserError):
        plan_layers(model, tr, va, optimizer_aware=True, strategy="kronecker")


def test_one_dimensional_rows_are_summed_at_capture_and_are_the_per_sample_gradients(batches):
    """Biases and LayerNorm weights are captured already summed over tokens (`rules.token_sum`), and a
    LayerNorm weight's row uses the forward's own normalized input: each 1-D parameter's rows, rescaled to
    per-sample losses, are that parameter's per-sample gradient (float64, against one autograd call per
    sequence)."""
    from attribution.engine.capture import Capturer
    from attribution.engine.exact import _params
    from attribution.engine.task import LanguageModelingTask

    tr, tm, _, _ = batches
    model = tiny_gpt2()
    ref = per_sample_grads(model, tr, tm)
    cap = Capturer(model)
    task = LanguageModelingTask()
    _, train = cap.train(lambda: task.per_sequence_loss(model, tr, tm))
    model.zero_grad(set_to_none=True)
    cap.remove()
    offset, checked = 0, 0
    for p in _params(model):
        size = p.numel()
        if p.dim() == 1:
            uses = train.uses[id(p)]
            assert all(u.col is None and u.row.shape == (len(tr), 1, size) for u in uses)
            got = sum(u.row[:, 0] for u in uses)
            assert rel_err(got, ref[:, offset : offset + size]) <= 1e-10
            checked += 1
        offset += size
    assert checked >= 10  # every bias and LayerNorm weight of the two blocks, the final LayerNorm
    assert train.tokens == tr.numel()
