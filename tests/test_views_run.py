"""The attribution views on real (tiny) runs: a text's default-view values do not depend on which other
texts the run valued, and the royalty numbers do not depend on the view at all."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attribution.train import RunConfig, train_and_value
from attribution.values import RunValues
from attribution.values.views import DEFAULT_VIEW, REFERENCE_SET
from attribution.workflows import explore
from tests.train_fixtures import write_corpus, write_val


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("views_run")
    write_corpus(tmp)
    write_val(tmp, "a", 3)
    write_val(tmp, "b", 4, seed=9)
    return tmp


def _run(folder, name: str, val: dict[str, str]):
    cfg = RunConfig(
        corpus=[str(folder / "corpus.jsonl")],
        val={k: str(folder / f"{v}.jsonl") for k, v in val.items()},
        out=str(folder / name),
        preset="test-micro",
        steps=6,
        seed=3,
        device="cpu",
        dtype="float64",  # exact quantities compared in float64: float32 sums differ by grouping only
        reference=4,
        cache_dir=str(folder / "cache"),
        progress=False,
    )
    return train_and_value(cfg)


@pytest.fixture(scope="module")
def runs(folder):
    return _run(folder, "alone", {"a": "a"}), _run(folder, "more", {"a": "a", "b": "b"})


def _of_a(run, view: str) -> pd.Series:
    ev = RunValues.read(run).view(view)
    ev = ev[ev["val_set"] == "a"].set_index(["val_id", "doc_id"]).sort_index()
    return ev["attribution"]


@pytest.mark.parametrize("view", [DEFAULT_VIEW, "standout", "contrast_per_token"])
def test_a_texts_views_do_not_change_when_other_texts_are_valued(runs, view):
    alone, more = runs
    x, y = _of_a(alone, view), _of_a(more, view)
    assert len(x) > 0 and x.index.equals(y.index)
    assert np.abs(x.to_numpy()).max() > 0  # the comparison is not between two empty columns
    np.testing.assert_allclose(y.to_numpy(), x.to_numpy(), rtol=1e-9, atol=1e-12 * np.abs(x.to_numpy()).max())
    # the reference set is what makes it so: it is in both runs, the same 4 texts
    refs = [
        set(ev.loc[ev["val_set"] == REFERENCE_SET, "val_id"])
        for ev in (RunValues.read(r).examples() for r in runs)
    ]
    assert refs[0] == refs[1] and len(refs[0]) == 4


def test_royalties_are_the_same_under_every_default_view(runs, tmp_path):
    """The royalty tables use the raw additive values: whichever view the manifest names as the default,
    the owners' payouts are the same, and they are the positive-share rule on the documents' raw
    values, recomputed here by hand. The views themselves do differ on this run, so a royalty path that
    read the `attribution` column would fail this test."""
    import shutil

    from attribution.values.manifest import Manifest

    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    tables, attributions = [], []
    for view in ["value", DEFAULT_VIEW, "standout", "contrast_per_token"]:
        m = Manifest.read(run)
        m.values.default_view = view
        m.write(run)
        loaded = explore.load_run(run)
        assert loaded.manifest.default_view == view
        attributions.append(loaded.example_values["attribution"].to_numpy())
        tables.append(explore.royalty_table(loaded, pool=1000.0).set_index("owner")["payout"].sort_index())
    assert any(not np.allclose(attributions[0], a) for a in attributions[1:])
    for t in tables[1:]:
        pd.testing.assert_series_equal(t, tables[0], check_exact=True)
    # by hand: per document, the raw value summed over the validation sets, clipped at zero; per owner, the sum
    dv = pd.read_parquet(run / "doc_values.parquet")
    docs = pd.read_parquet(run / "docs.parquet")
    per_doc = dv.groupby("doc_id")["value"].sum().clip(lower=0)
    owner = docs.set_index("doc_id")["owner"]
    want = per_doc.groupby(owner.reindex(per_doc.index)).sum()
    want = 1000.0 * want / want.sum()
    got = tables[0].reindex(want.index).fillna(0.0)
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), atol=0.011)  # payouts are rounded to cents
