"""The standout z against a text's nearest reference texts (`views.nearest_reference`, `NEAREST_REFERENCE`).

A synthetic table of two kinds of text, "prose" and "code". Every document has a kind-dependent level
(how much it gives texts of each kind) plus noise; `register` gives every prose text a little more than
it gives code, `special` helps the claim t0 alone. The reference holds both kinds, code in the majority.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attribution.values import views
from attribution.values.views import REFERENCE_SET, nearest_reference, standout

N_DOCS = 30
PROSE_REFS = [f"prose-{i}" for i in range(6)]
CODE_REFS = [f"code-{i}" for i in range(12)]
CLAIMS = {"t0": "prose", "t1": "prose", "t2": "code"}


def _table(claims: dict[str, str] = CLAIMS, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    prose_level, code_level = rng.normal(0, 1, N_DOCS), rng.normal(0, 1, N_DOCS)
    docs = [f"d{i}" for i in range(N_DOCS - 2)] + ["register", "special"]
    prose_level[-2], code_level[-2] = 1.0, 0.0  # `register`: a little more for prose than for code
    rows = []
    texts = [(REFERENCE_SET, r, r.split("-")[0]) for r in PROSE_REFS + CODE_REFS]
    texts += [("claims", t, kind) for t, kind in claims.items()]
    for val_set, val_id, kind in texts:
        # one fixed stream per text, so that a text's values do not depend on which other texts exist
        noise = np.random.default_rng([seed, sum(map(ord, val_id)), len(val_id)]).normal(0, 0.05, N_DOCS)
        level = prose_level if kind == "prose" else code_level
        x = level + noise
        if val_id == "t0":
            x[-1] += 3.0  # `special` helps t0 alone
        rows += [
            {"doc_id": d, "val_set": val_set, "val_id": val_id, "value": float(v)}
            for d, v in zip(docs, x, strict=True)
        ]
    return pd.DataFrame(rows)


def _wide(ev: pd.DataFrame) -> pd.DataFrame:
    return ev.pivot(index="doc_id", columns="val_id", values="value")


def _direct(ev: pd.DataFrame, doc: str, val_id: str, k: int, pooled: bool = False) -> float:
    """z of one pair from the definition: the k reference texts whose columns correlate most with the
    text's (numpy's corrcoef; a reference text never counts itself), then mean and sample sd of the
    document's values for them; `pooled`: divided instead by the root median over every document of
    its sample variance for the same texts."""
    wide = _wide(ev)
    refs = [r for r in PROSE_REFS + CODE_REFS if r != val_id]
    corr = [np.corrcoef(wide[val_id], wide[r])[0, 1] for r in refs]
    near = [refs[i] for i in np.argsort(-np.asarray(corr), kind="stable")[:k]]
    ref = wide[near]
    scale = np.sqrt(np.median(ref.var(axis=1, ddof=1))) if pooled else ref.loc[doc].std(ddof=1)
    return float((wide.loc[doc, val_id] - ref.loc[doc].mean()) / scale)


def test_nearest_reference_is_the_most_correlated_columns():
    rng = np.random.default_rng(0)
    texts, ref = rng.normal(size=(40, 5)), rng.normal(size=(40, 9))
    ref[:, 4] = texts[:, 0] * 2 + 1 + rng.normal(0, 0.1, 40)  # text 0's near twin
    got = nearest_reference(texts, ref, 3)
    for j in range(texts.shape[1]):
        corr = [np.corrcoef(texts[:, j], ref[:, r])[0, 1] for r in range(ref.shape[1])]
        assert list(got[j]) == list(np.argsort(corr)[::-1][:3])
    assert got[0, 0] == 4
    # a reference text is never its own neighbour
    assert 4 not in nearest_reference(ref[:, [4]], ref, 8, own=np.array([4]))[0]


@pytest.mark.parametrize("k", [4, 6, 9])
def test_standout_against_the_nearest_matches_its_definition(k):
    ev = _table()
    z = standout(ev, nearest=k)
    for row, got in zip(ev.itertuples(), z, strict=True):
        if row.val_set == REFERENCE_SET:
            assert np.isnan(got)
        else:
            assert got == pytest.approx(_direct(ev, row.doc_id, row.val_id, k), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("k", [5, 17, 100])
def test_a_pooled_z_matches_its_definition(k, monkeypatch):
    """The checkpoint cosine's z (`views.POOLED_SCALE`) divides by one scale per text, for the claims and
    for the reference rows' leave-one-out z alike, against the nearest k texts or (k >= 17) all others."""
    assert "checkpoint_cosine" in views.POOLED_SCALE
    ev = _table()
    monkeypatch.setitem(views.NEAREST_REFERENCE, "checkpoint_cosine", k)
    z = views.VIEWS["standout_checkpoint"].fn(
        ev.rename(columns={"value": "checkpoint_cosine"}), pd.DataFrame()
    )
    for row, got in zip(ev.itertuples(), z, strict=True):
        assert got == pytest.approx(_direct(ev, row.doc_id, row.val_id, k, pooled=True), rel=1e-10, abs=1e-12)


def test_a_pooled_z_does_not_let_a_flat_document_outrank_the_original():
    """A document whose values barely move over the reference texts (an arithmetic drill) reaches a large
    sample z from a small excess; the pooled z ranks by the excess itself, so the original comes first."""
    ev = _table()
    flat = ev["doc_id"] == "d0"
    ev.loc[flat, "value"] = 0.1 + 1e-4 * (np.arange(flat.sum()) % 3)  # almost no spread
    ev.loc[flat & (ev["val_id"] == "t0"), "value"] = 0.2  # a small excess for t0
    cos = ev.rename(columns={"value": "checkpoint_cosine"})
    sample = standout(ev, nearest=6).groupby(ev["val_id"]).get_group("t0")
    pooled = standout(cos, "checkpoint_cosine", nearest=6).groupby(ev["val_id"]).get_group("t0")
    doc = ev.loc[sample.index, "doc_id"]
    assert doc[sample.idxmax()] == "d0" and doc[pooled.idxmax()] == "special"


def test_a_reference_no_larger_than_k_gives_the_plain_z():
    ev = _table()
    n_ref = len(PROSE_REFS + CODE_REFS)
    plain = standout(ev)  # "value" has no nearest default: every reference text
    for k in (n_ref, n_ref + 5):
        assert np.array_equal(standout(ev, nearest=k).to_numpy(), plain.to_numpy(), equal_nan=True)
    assert not np.allclose(standout(ev, nearest=6).to_numpy()[~plain.isna()], plain.dropna().to_numpy())


def test_the_kind_of_the_claim_is_what_it_is_measured_against():
    """`register` gives prose a little more than code: against a reference that is mostly code it stands
    out for every prose text; against the prose texts nearest a prose claim it does not, while `special`
    still stands out for t0."""
    ev = _table()
    by_all = ev.assign(z=standout(ev)).set_index(["doc_id", "val_id"]).z
    by_near = ev.assign(z=standout(ev, nearest=len(PROSE_REFS))).set_index(["doc_id", "val_id"]).z
    assert by_all["register", "t1"] > 1.0 and abs(by_near["register", "t1"]) < 0.5 * by_all["register", "t1"]
    assert by_near["special", "t0"] > 20 and by_near["special", "t0"] == by_near.loc[:, "t0"].max()


@pytest.mark.parametrize("column", ["value", "checkpoint_cosine"])
@pytest.mark.parametrize("k", [5, 100])
def test_a_texts_nearest_z_does_not_depend_on_the_other_texts(column, k):
    alone = _table({"t0": "prose"}).rename(columns={"value": column})
    many = _table({**CLAIMS, **{f"x{i}": "code" for i in range(5)}}).rename(columns={"value": column})
    z_alone = alone.assign(z=standout(alone, column, nearest=k)).query("val_id == 't0'").set_index("doc_id").z
    z_many = many.assign(z=standout(many, column, nearest=k)).query("val_id == 't0'").set_index("doc_id").z
    np.testing.assert_array_equal(z_alone.sort_index().to_numpy(), z_many.sort_index().to_numpy())


def test_the_checkpoint_view_uses_its_nearest_default(monkeypatch):
    ev = _table().rename(columns={"value": "checkpoint_cosine"})
    view = views.VIEWS["standout_checkpoint"].fn
    monkeypatch.setitem(views.NEAREST_REFERENCE, "checkpoint_cosine", 5)
    np.testing.assert_array_equal(
        view(ev, pd.DataFrame()).to_numpy(),
        np.nan_to_num(
            views._standout_z(ev, "checkpoint_cosine", (ev.val_set == REFERENCE_SET).to_numpy(), 4, 5)
        ),
    )
    near = standout(ev, "checkpoint_cosine")
    assert np.array_equal(
        near.to_numpy(), standout(ev, "checkpoint_cosine", nearest=5).to_numpy(), equal_nan=True
    )
    assert not np.allclose(near.dropna(), standout(ev, "checkpoint_cosine", nearest=100).dropna())


def test_the_compare_summary_says_what_a_text_was_measured_against(monkeypatch):
    from attribution.analysis.compare import _compared

    monkeypatch.setitem(views.NEAREST_REFERENCE, "checkpoint_cosine", 36)
    assert _compared("standout_checkpoint", 48).startswith(
        "36 of the run's 48 reference examples nearest the text"
    )
    assert _compared("standout_checkpoint", 16) == "16 examples of the run's reference set"
    assert _compared("standout", 48) == "48 examples of the run's reference set"  # the raw value: every text
