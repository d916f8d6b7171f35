"""Attribution views: per-example validation gradient norms (ghost vs brute force), the view math,
and that the raw additive `value` stays untouched (royalties use it)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_engine_helpers import one_thread, ragged_batch, rel_err, tiny_gpt2  # noqa: F401

from attribution.engine import ValSet, Valuer
from attribution.engine.exact import per_sample_grads
from attribution.errors import UserError
from attribution.values import views


@pytest.mark.parametrize("order", [1, 2])
def test_val_example_grad_norms_match_brute_force(order):
    """||g_val_j||^2 of every validation sequence, from the ghost trick, at the weights the values used."""
    model = tiny_gpt2()
    va, vm = ragged_batch(3, 9, seed=7)
    valuer = Valuer(
        model, {"v": ValSet(va, vm, ["a", "b", "c"])}, per_example=["v"], grad_norms=True, order=order
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(2):
        tr, tm = ragged_batch(4, 10, seed=60 + step)
        g = per_sample_grads(model, va, vm)
        ref = (g * g).sum(1)
        opt.zero_grad()
        valuer.forward_backward(tr, tm)
        sv = valuer.values(0.05)
        opt.step()
        sv = valuer.after_step() if order == 2 else sv
        got = torch.from_numpy(sv.val_example_sq_norm["v"])
        assert got.dtype == torch.float64 and got.shape == (3,)
        assert rel_err(got, ref) <= 1e-6


def _frame(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    docs = pd.DataFrame({"doc_id": ["d0", "d1", "d2"], "n_tokens": [10, 200, 40]})
    rows = [(d, s, f"{s}{j}") for s in ("p", "q") for j in range(3) for d in docs["doc_id"]]
    ev = pd.DataFrame(rows, columns=["doc_id", "val_set", "val_id"])
    ev["value"] = rng.normal(size=len(ev))
    ev["value_cosine"] = rng.normal(size=len(ev))
    return ev, docs


def test_per_token_and_leave_one_out_contrast():
    ev, docs = _frame()
    out = views.compute(ev, docs)
    np.testing.assert_allclose(
        out["view_per_token"], ev["value"] / ev["doc_id"].map({"d0": 10, "d1": 200, "d2": 40})
    )
    for i in (0, 7, 16):  # contrast = value - mean of the same document's value over the 5 other texts
        r = ev.iloc[i]
        others = ev[(ev["doc_id"] == r["doc_id"]) & (ev.index != i)]["value"]
        assert out["view_contrast"].iloc[i] == pytest.approx(r["value"] - others.mean(), rel=1e-12)
    ref = views.contrast(ev, reference="q", lam=0.5)
    r = ev.iloc[0]  # an example of set p against set q's mean
    q_mean = ev[(ev["doc_id"] == r["doc_id"]) & (ev["val_set"] == "q")]["value"].mean()
    assert ref.iloc[0] == pytest.approx(r["value"] - 0.5 * q_mean, rel=1e-12)
    with pytest.raises(UserError, match="no per-example values"):
        views.contrast(ev, reference="nope")


def test_raw_value_untouched_and_default_column():
    """Royalty numbers stay the raw additive values: computing views never changes `value`."""
    ev, docs = _frame(1)
    before = ev["value"].to_numpy().copy()
    out = views.compute(ev, docs)
    assert np.array_equal(out["value"].to_numpy(), before) and np.array_equal(ev["value"].to_numpy(), before)
    assert set(views.available(ev, docs)) >= {"value", "per_token", "contrast", "cosine", "contrast_cosine"}
    assert "normalized" not in views.available(ev, docs)  # needs value_normalized
    assert "per_token" not in views.available(ev)  # needs the documents' n_tokens
    # no checkpoint cosines in this frame: the default falls back to the in-run default view
    assert "checkpoint_cosine" not in ev.columns and views.default_for(False) == views.IN_RUN_VIEW
    assert np.array_equal(out["attribution"].to_numpy(), out[views.column_of(views.IN_RUN_VIEW)].to_numpy())
    with_ckpt = views.compute(ev.assign(checkpoint_cosine=ev["value"] * 0.5), docs)
    assert np.array_equal(
        with_ckpt["attribution"].to_numpy(), with_ckpt[views.column_of(views.DEFAULT_VIEW)].to_numpy()
    )
    with pytest.raises(UserError, match="unknown view"):
        views.compute(ev, docs, ["bogus"])
