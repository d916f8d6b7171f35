"""Per-example columns that span several sequences (`ValSet(groups=)`): a validation document longer than
the context is one column, valued against its gradient, the sum of its sequences' gradients.

Exact in float64 against the ungrouped engine (each sequence its own column, summed afterwards) and, for
the columns' gradient norms, against brute-force per-sample gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine_helpers import one_thread, ragged_batch, tiny_gpt2  # noqa: F401

from attribution.engine import ValSet, Valuer
from attribution.engine.exact import per_sample_grads
from attribution.errors import UserError

GROUPS = [0, 0, 2, 1, 2, 2, 0]  # seven sequences, three documents, not contiguous


def _run(grouped: bool, *, order: int, aware: bool, strategy: str | None, chunk: int | None):
    va, vm = ragged_batch(len(GROUPS), 9, seed=11)
    model = tiny_gpt2()
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-2)
        if aware
        else torch.optim.SGD(model.parameters(), lr=5e-2)
    )
    vs = ValSet(va, vm, ["a", "b", "c"], groups=GROUPS) if grouped else ValSet(va, vm)
    valuer = Valuer(
        model,
        {"each": vs, "whole": ValSet(va[:4], vm[:4])},
        order=order,
        per_example=["each"],
        optimizer_aware=aware,
        strategy=strategy,
        grad_norms=True,
        val_chunk=chunk,
    )
    out, brute = [], []
    for step in range(3):
        valuer.forward_backward(*ragged_batch(4, 10, seed=40 + step))
        sv = valuer.values(opt.param_groups[0]["lr"], optimizer=opt if aware else None)
        g = per_sample_grads(model, va, vm)  # at the weights the values (and norms) use: before the step
        doc = torch.zeros(3, g.shape[1], dtype=g.dtype).index_add_(0, torch.tensor(GROUPS), g)
        brute.append(((doc * doc).sum(1)).numpy())
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(valuer.after_step() if order == 2 else sv)
    return out, brute


@pytest.mark.parametrize(
    "order,aware,strategy",
    [
        (1, False, None),
        (1, False, "ghost"),
        (1, True, None),
        (2, False, "ghost"),
        (2, True, None),
        (2, False, "project"),
    ],
)
@pytest.mark.parametrize("chunk", [None, 2])
def test_a_grouped_column_is_the_sum_of_its_sequences(order, aware, strategy, chunk):
    per_seq, _ = _run(False, order=order, aware=aware, strategy=strategy, chunk=None)
    grouped, brute = _run(True, order=order, aware=aware, strategy=strategy, chunk=chunk)
    column = np.asarray(GROUPS)
    for ref, sv, norms in zip(per_seq, grouped, brute, strict=True):
        want = np.stack([ref.per_example["each"][:, column == c].sum(1) for c in range(3)], 1)
        scale = np.abs(want).max()
        assert scale > 0
        np.testing.assert_allclose(sv.per_example["each"], want, rtol=1e-10, atol=1e-12 * scale)
        for name in ("each", "whole"):
            np.testing.assert_allclose(sv.per_set[name], ref.per_set[name], rtol=1e-10, atol=1e-12 * scale)
            assert sv.val_grad_sq_norm[name] == pytest.approx(ref.val_grad_sq_norm[name], rel=1e-10)
        np.testing.assert_allclose(sv.train_grad_sq_norm, ref.train_grad_sq_norm, rtol=1e-12)
        assert sv.val_example_sq_norm["each"].shape == (3,)
        np.testing.assert_allclose(sv.val_example_sq_norm["each"], norms, rtol=1e-9)
        # a sequence's own norm is not its document's: the test would notice norms left per sequence
        assert not np.allclose(ref.val_example_sq_norm["each"][[0, 3, 2]], norms, rtol=1e-3)


def test_grouped_side_holds_one_row_per_document():
    """What the grouping is for: the dense side (the tied head's is the step's largest tensor) has a row
    per document, not per sequence."""
    va, vm = ragged_batch(len(GROUPS), 9, seed=11)
    model = tiny_gpt2()
    valuer = Valuer(
        model, {"each": ValSet(va, vm, groups=GROUPS)}, per_example=["each"], strategy="materialize"
    )
    valuer.forward_backward(*ragged_batch(4, 10, seed=1))
    side, _ = valuer._val_side("each")
    assert side.groups == 3 and side.dense and all(len(g) == 3 for g in side.dense.values())
    assert valuer.plans()["each"].sizes["groups"] == 3


def test_valset_groups_are_checked():
    ids = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(UserError, match="2 validation groups for 3 sequences"):
        ValSet(ids, groups=[0, 1])
    with pytest.raises(UserError, match=">= 0"):
        ValSet(ids, groups=[0, -1, 1])
    with pytest.raises(UserError, match="group 2 has no name"):
        ValSet(ids, names=["a", "b"], groups=[0, 2, 1])
    vs = ValSet(ids, groups=[1, 1, 0])
    assert vs.names == ["0", "1"] and vs.n_columns == 2 and len(vs) == 3


@pytest.mark.parametrize("strategy", ["materialize", "kronecker"])
def test_by_column_adds_each_sequences_gradient_into_its_column(strategy):
    """`ByColumn` (one GEMM per run of a column's sequences, added into the caller's buffer) against the
    per-sequence gradients scattered into the columns, in float64, for every kind of use: a dense weight,
    an embedding (index rows, tied to the dense one), and a 1-D parameter's summed rows. The columns repeat
    out of order, and the buffer already holds an earlier chunk's sums."""
    from attribution.engine.rules import Use
    from attribution.engine.strategies import Param, get_strategy
    from attribution.engine.strategies.materialize import ByColumn, column_runs

    gen = torch.Generator().manual_seed(5)
    n, t, p0, p1 = 7, 5, 70, 66  # past KRON_DIM (64) on both sides: kronecker projects
    index = torch.tensor([2, 2, 0, 3, 3, 3, 2])
    assert column_runs(index) == [(2, 0, 2), (0, 2, 3), (3, 3, 6), (2, 6, 7)]
    dense = [
        Use(
            torch.randn(n, t, p0, generator=gen, dtype=torch.float64),
            torch.randn(n, t, p1, generator=gen, dtype=torch.float64),
            False,
        ),
        Use(
            torch.randint(0, p0, (n, t), generator=gen),
            torch.randn(n, t, p1, generator=gen, dtype=torch.float64),
            True,
        ),
    ]
    one_d = [Use(torch.randn(n, 1, p0, generator=gen, dtype=torch.float64), None, False)]
    for uses, shape in ((dense, (p0, p1)), (one_d, (p0, 1))):
        f = get_strategy(strategy if uses is dense else "materialize").val_gradient
        param = Param(0, "w", shape, torch.float64)
        per_seq = f(uses, param, True)
        earlier = torch.randn(4, *per_seq.shape[1:], generator=gen, dtype=torch.float64)
        want = earlier.clone().index_add_(0, index, per_seq)
        buf = earlier.clone()
        got = f(uses, param, True, ByColumn(index, lambda shape, dtype, buf=buf: buf, column_runs(index)))
        assert got is buf
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


@pytest.mark.parametrize("strategy", ["ghost", "materialize"])
@pytest.mark.parametrize("chunk", [None, 3])
def test_each_columns_norm_is_its_own_though_the_pass_takes_sequences_longest_first(strategy, chunk):
    """A validation pass takes a set's sequences longest first and trims each chunk to its longest
    (`ValSet.longest_first`), so the captured sequences are out of the set's order: every per-example
    column must still get its own sequence's gradient norm (brute force, float64)."""
    va, vm = ragged_batch(7, 9, seed=11)
    vs = ValSet(va, vm)
    order, length = vs.longest_first()
    assert not torch.equal(order, torch.arange(7))  # the test needs a pass out of the set's order
    assert torch.equal(length, vm.sum(1)) and bool((length[order].diff() <= 0).all())
    model = tiny_gpt2()
    valuer = Valuer(
        model, {"each": vs}, per_example=["each"], strategy=strategy, grad_norms=True, val_chunk=chunk
    )
    valuer.forward_backward(*ragged_batch(4, 10, seed=1))
    sv = valuer.values(0.1)
    g = per_sample_grads(model, va, vm)
    np.testing.assert_allclose(sv.val_example_sq_norm["each"], (g * g).sum(1).numpy(), rtol=1e-9)
