"""The standout test behind `non-obvious influence`: z against the run's fixed reference set, and the label.

A synthetic `example_values` table: `special` helps text t0 far more than it helps the reference
texts (z high), `generic` helps every text and every reference text alike (z low), the rest is noise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attribution.analysis.compare import Thresholds, label
from attribution.values import views
from attribution.values.views import MIN_REFERENCE, REFERENCE_SET, standout

TEXTS = ["t0", "t1", "t2"]
REFS = [f"r{i}" for i in range(10)]
DOCS = ["special", "generic", "noise-a", "noise-b"]


@pytest.fixture
def ev() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for val_set, ids in (("claims", TEXTS), (REFERENCE_SET, REFS)):
        for val_id in ids:
            for doc in DOCS:
                x = rng.normal(0.0, 1e-3)
                x += {"generic": 0.5, "special": 0.2 if val_id == "t0" else 0.0}.get(doc, 0.0)
                rows.append({"doc_id": doc, "val_set": val_set, "val_id": val_id, "value": x})
    return pd.DataFrame(rows)


def _direct(ev: pd.DataFrame, doc: str, val_id: str) -> float:
    """z of one pair, straight from its definition."""
    own = ev[(ev.doc_id == doc) & (ev.val_id == val_id)].value.to_numpy()[0]
    ref = ev[(ev.doc_id == doc) & (ev.val_set == REFERENCE_SET)].value.to_numpy()
    return float((own - ref.mean()) / ref.std(ddof=1))


def test_standout_z_matches_numpy(ev):
    z = standout(ev)
    for row, got in zip(ev.itertuples(), z, strict=True):
        if row.val_set == REFERENCE_SET:
            assert np.isnan(got)  # a reference text is not measured against itself
        else:
            assert got == pytest.approx(_direct(ev, row.doc_id, row.val_id), rel=1e-12)
    by = ev.assign(z=z).set_index(["doc_id", "val_id"]).z
    assert by["special", "t0"] > 100 and abs(by["special", "t1"]) < 3
    assert all(abs(by["generic", t]) < 3 for t in TEXTS)  # generic helpfulness does not stand out


def test_standout_is_nan_without_enough_reference_or_spread(ev):
    few = ev[~((ev.doc_id == "noise-a") & ev.val_id.isin(REFS[MIN_REFERENCE - 1 :]))]  # 3 reference rows
    flat = ev.copy()
    flat.loc[(flat.doc_id == "noise-b") & (flat.val_set == REFERENCE_SET), "value"] = 0.25  # sd == 0
    for table, doc in ((few, "noise-a"), (flat, "noise-b")):
        z = standout(table)
        assert z[table.doc_id == doc].isna().all() and z[table.doc_id == "special"].notna().any()
    assert standout(ev[ev.val_set != REFERENCE_SET]).isna().all()


def test_standout_unchanged_by_scaling_shifting_and_per_token(ev):
    """Scaling a document's values (per-token view) or shifting them (what the contrast view does to a
    text outside the reference) leaves its z alone."""
    z = standout(ev)
    special = ev.doc_id == "special"
    for transformed in (ev.value.where(~special, ev.value * 7.5), ev.value.where(~special, ev.value - 0.3)):
        np.testing.assert_allclose(standout(ev.assign(value=transformed)), z, rtol=1e-8)
    docs = pd.DataFrame({"doc_id": DOCS, "n_tokens": [40, 7, 300, 12]})
    np.testing.assert_allclose(standout(ev.assign(value=views.per_token(ev, docs))), z, rtol=1e-10)


def _pair(z: float, value: float = 0.3) -> dict:
    return {
        "ngram_containment": 0.0,
        "containment_doc_in_val": 0.0,
        "longest_common_span": 2,
        "semantic_sim": 0.1,
        "shapley_rank": 1,
        "shapley_value": value,
        "standout_z": z,
    }


def test_non_obvious_influence_needs_standout(ev):
    t, z = Thresholds().for_basis("value"), standout(ev)
    by = ev.assign(z=z).set_index(["doc_id", "val_id"]).z
    assert label(_pair(by["special", "t0"]), t, k=5) == "non-obvious influence"
    assert label(_pair(by["generic", "t0"]), t, k=5) == "none"
    assert label(_pair(float("nan")), t, k=5) == "none"  # cannot stand out
    assert label(_pair(t.influence_z), t, k=5) == "non-obvious influence"  # at the threshold
    assert label(_pair(by["special", "t0"], value=-0.1), t, k=5) == "none"  # still needs a positive value
    assert label(_pair(4.0), Thresholds.parse({"influence_z": "5"}), k=5) == "none"
    # a run without a reference set: the rule without the standout test
    assert label(_pair(float("nan")), t, k=5, test_standout=False) == "non-obvious influence"


def test_influence_threshold_follows_the_z_basis_unless_given():
    from attribution.analysis.compare import INFLUENCE_Z

    assert Thresholds().for_basis("checkpoint_cosine").influence_z == INFLUENCE_Z["checkpoint_cosine"]
    assert Thresholds().for_basis("value_cosine").influence_z == INFLUENCE_Z["value_cosine"]
    assert Thresholds().for_basis("value").influence_z == max(INFLUENCE_Z.values())  # not measured: strictest
    assert Thresholds.parse({"influence_z": "7"}).for_basis("checkpoint_cosine").influence_z == 7.0
    assert INFLUENCE_Z["checkpoint_cosine"] != INFLUENCE_Z["value_cosine"]  # the lookup is not moot
