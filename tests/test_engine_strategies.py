"""The scoring strategies are a registry: a strategy registered from outside the engine is planned and scored."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_engine_helpers import one_thread, ragged_batch, tiny_gpt2  # noqa: F401

from attribution.engine import (
    Strategy,
    grad_dot_products,
    plan_layers,
    register_strategy,
    unregister_strategy,
)
from attribution.engine.strategies import get_strategy, registered
from attribution.errors import UserError

BUILT_IN = ["ghost", "project", "materialize", "kronecker"]


@pytest.fixture
def toy_strategy():
    """A renamed copy of `materialize`, registered for one test only."""
    toy = register_strategy(
        dataclasses.replace(get_strategy("materialize"), name="toy", label="toy", order=90)
    )
    try:
        yield toy
    finally:
        unregister_strategy("toy")


def test_registered_toy_strategy_is_planned_and_scores_like_materialize(toy_strategy: Strategy):
    tr, tm = ragged_batch(4, 10, seed=1)
    va, vm = ragged_batch(3, 8, seed=2)
    model = tiny_gpt2()
    plan = plan_layers(model, tr, va, train_mask=tm, val_mask=vm, strategy="toy")
    assert plan.counts() == {"toy": len(plan.layers)}
    assert all("toy" in lp.costs for lp in plan.layers.values())  # costed like any exact strategy
    assert str(plan).splitlines()[1].split()[-2:] == ["toy", "reason"]  # its own cost column
    got = grad_dot_products(model, tr, va, train_mask=tm, val_mask=vm, strategy="toy")
    ref = grad_dot_products(model, tr, va, train_mask=tm, val_mask=vm, strategy="materialize")
    assert torch.equal(got, ref)
    mixed = grad_dot_products(
        model, tr, va, train_mask=tm, val_mask=vm, strategy={"transformer.h.0": "toy", "*": "materialize"}
    )
    assert torch.equal(mixed, ref)


def test_toy_strategy_is_gone_after_unregistering(toy_strategy: Strategy):
    unregister_strategy("toy")
    try:
        assert [s.name for s in registered()] == BUILT_IN
        with pytest.raises(UserError, match="unknown strategy 'toy'"):
            get_strategy("toy")
    finally:
        register_strategy(toy_strategy)  # the fixture unregisters it again


def test_unknown_strategy_is_a_user_error_naming_the_known_ones():
    tr, _ = ragged_batch(2, 6, seed=1)
    model = tiny_gpt2()
    with pytest.raises(UserError, match="unknown strategy 'nope'") as err:
        grad_dot_products(model, tr, tr, strategy="nope")
    assert all(name in str(err.value) for name in BUILT_IN)
    assert str(err.value).endswith("choose from " + ", ".join(BUILT_IN))


def test_registry_refuses_duplicates_and_uncosted_exact_strategies():
    materialize = get_strategy("materialize")
    with pytest.raises(ValueError, match="already registered"):
        register_strategy(materialize)
    with pytest.raises(ValueError, match="needs a cost"):
        register_strategy(dataclasses.replace(materialize, name="uncosted", cost=None))
    with pytest.raises(ValueError, match="must say how it approximates"):
        register_strategy(dataclasses.replace(materialize, name="vague", exact=False))
    assert [s.name for s in registered()] == BUILT_IN


def test_optimizer_aware_refusal_names_the_preconditionable_strategies():
    tr, _ = ragged_batch(2, 6, seed=1)
    with pytest.raises(UserError, match="need 'project' or 'materialize'"):
        plan_layers(tiny_gpt2(), tr, tr, optimizer_aware=True, strategy="ghost")
