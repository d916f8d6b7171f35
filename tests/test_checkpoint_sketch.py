"""The checkpoint sketch index (`claim --fast` under the default view): the count sketch against its explicit
matrix, unbiasedness, the sink against brute-force gradients, and a real run end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from attribution.engine.task import LanguageModelingTask
from attribution.errors import UserError
from attribution.values.results import RunValues
from attribution.values.views import DEFAULT_VIEW, IN_RUN_VIEW
from attribution.workflows import checkpoint_similarity as cs
from attribution.workflows import checkpoint_sketch as ck
from attribution.workflows.claim_fast import estimate, fast_claim
from tests.hf_fixtures import tiny_model
from tests.test_checkpoint_similarity import _brute, _items, _states
from tests.test_claim_replay import _cosine_atol, _run
from tests.train_fixtures import write_corpus, write_val


def _matrix(sketch: ck.CountSketch, n: int) -> np.ndarray:
    """The `[width, n]` matrix of a count sketch, read from its hashes and signs."""
    c = np.zeros((sketch.width, n))
    for start, h, s in sketch.parts:
        c[h.numpy(), np.arange(start, start + len(h))] = s.numpy()
    return c


def test_the_count_sketch_is_its_hash_matrix(monkeypatch):
    monkeypatch.setattr(ck, "CHUNK", 7)  # several draws, the last one short
    monkeypatch.setattr(ck, "APPLY", 3)  # and several slices of each
    n, width = 30, 5
    sketch = ck.CountSketch(n, width, seed=3, link=1, device="cpu", dtype=torch.float64)
    c = _matrix(sketch, n)
    assert (np.abs(c).sum(0) == 1).all()  # every coordinate in exactly one bucket, sign +-1
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(sketch(x).numpy(), x.numpy() @ c.T, rtol=1e-12, atol=1e-12)
    # the same (seed, link) draws the same matrix; another link draws another
    again = ck.CountSketch(n, width, seed=3, link=1, device="cpu", dtype=torch.float64)
    assert (_matrix(again, n) == c).all()
    assert (
        _matrix(ck.CountSketch(n, width, seed=3, link=2, device="cpu", dtype=torch.float64), n) != c
    ).any()


def test_count_sketch_inner_products_are_unbiased():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=200), rng.normal(size=200)
    b += 0.5 * a
    ta, tb = (torch.from_numpy(v[None]) for v in (a, b))
    est = np.array(
        [
            float(s(ta) @ s(tb).T)
            for s in (ck.CountSketch(200, 16, seed, 0, "cpu", torch.float64) for seed in range(600))
        ]
    )
    se = est.std(ddof=1) / np.sqrt(len(est))
    assert abs(est.mean() - a @ b) < 5 * se and se < 0.1 * abs(a @ b)


def test_the_sinks_vectors_estimate_the_mean_cosine_over_links():
    """Through `cosines`' sink, `<v(t), v(d)>` is `(1/L) sum_s <C_s u_s(t), C_s u_s(d)>` of the unit sides,
    so it estimates the exact checkpoint cosine (brute force) within the sketch's error."""
    model = tiny_model()
    states, ks = _states(model, 3)
    texts, docs = _items(1, 3, (2, 1, 3)), _items(2, 5, (1, 4, 2, 1, 3))

    def loader(i):
        def load():
            model.load_state_dict(states[i])
            return ks[i]

        return load

    dim = 3 * 4096
    sinks = {kind: ck.Sketcher(kind, dim, 3, seed=5) for kind in ("doc", "text")}
    exact = cs.cosines(
        model,
        LanguageModelingTask(),
        [loader(i) for i in range(3)],
        texts,
        docs,
        sink=lambda *a: [s(*a) for s in sinks.values()],
    )[0]
    np.testing.assert_allclose(
        exact, _brute(model, states, ks, texts, docs, cs.POWER), rtol=1e-10, atol=1e-12
    )
    est = sinks["text"].vectors @ sinks["doc"].vectors.T
    assert sinks["doc"].vectors.shape == (5, dim) and sinks["text"].vectors.shape == (3, dim)
    # each link's block is the count sketch of a unit vector, scaled by 1/sqrt(L)
    for kind in ("doc", "text"):
        blocks = np.split(sinks[kind].vectors, np.cumsum(sinks[kind].widths)[:-1], axis=1)
        norms = np.array([np.linalg.norm(b, axis=1) for b in blocks])
        assert np.all(np.abs(norms * np.sqrt(3) - 1) < 0.2)
    # error of a count-sketch inner product of unit vectors: sd <= sqrt(2 / width) per link, mean of L links
    assert np.abs(est - exact).max() < 6 * np.sqrt(2 / dim)
    assert np.abs(exact).max() > 10 * np.sqrt(2 / dim)  # the test would notice a wrong estimate


def test_the_dimension_splits_over_the_links():
    assert ck.widths(10, 3) == [4, 3, 3] and sum(ck.widths(512, 5)) == 512
    with pytest.raises(UserError, match="--sketch-dim 2 is smaller than the run's 3 kept checkpoints"):
        ck.widths(2, 3)


# ---------------------------------------------------------------------------------------------
# A real run


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt_sketch")
    write_corpus(tmp)
    write_val(tmp, "a", 3)
    return tmp


@pytest.fixture(scope="module")
def run(corpus_dir):
    """float64, so that the exact numbers of a claim and of the run agree to rounding."""
    return _run(corpus_dir, "base", sketch_dim=2048, dtype="float64")


@pytest.fixture(scope="module")
def own_texts(corpus_dir, run):
    """The run's own validation texts as claims: their exact cosines are in the run's table."""
    path = corpus_dir / "own.jsonl"
    shutil.copy(run / "val_sets" / "a.jsonl", path)
    return path


def _table(run) -> pd.DataFrame:
    return pd.read_parquet(run / "checkpoint_values.parquet")


def test_the_run_writes_the_checkpoint_index(run):
    from attribution.train import chain
    from attribution.values.manifest import Manifest

    meta = json.loads((run / ck.FOLDER / ck.META).read_text())
    assert meta["links"] == [lk.step for lk in chain.links(run)] and len(meta["links"]) >= 2
    assert (
        meta["dim"] == 2048 == sum(meta["widths"]) + 1 and meta["power"] == cs.POWER
    )  # + the reserved column
    # the documents the run trained (those with values), in the checkpoint table's order
    trained = set(pd.read_parquet(run / "doc_values.parquet").query("n_seen > 0")["doc_id"])
    assert meta["doc_ids"] == [d for d in pd.unique(_table(run)["doc_id"]) if d in trained]
    assert 10 < len(trained) < len(pd.unique(_table(run)["doc_id"]))
    manifest = Manifest.read(run)
    index = ck.read(run, manifest.config)
    assert index.load().ntotal == len(meta["doc_ids"])
    # the manifest describes both of the run's indexes
    described = manifest.indexes[ck.FOLDER]
    assert described["documents"] == len(meta["doc_ids"]) and described["links"] == meta["links"]
    assert set(described["files"]) == {
        "checkpoint_sketch/index.faiss",
        "checkpoint_sketch/index_standout.faiss",
    }
    assert manifest.indexes["sketch"]["dim"] == 2048 and manifest.indexes["sketch"]["documents"] > 0


def test_fast_ranks_by_the_default_view_and_confirms_with_the_runs_exact_cosines(run, own_texts, tmp_path):
    r = fast_claim(run, own_texts, tmp_path / "fast", k=5, progress=False)
    assert r.view == DEFAULT_VIEW and r.confirmed and "checkpoint similarity" in r.how
    got = r.table.set_index(["claim_id", "doc_id"])
    table = _table(run)
    want = table[table["val_set"] == "a"].set_index(["val_id", "doc_id"])["checkpoint_cosine"]
    atol = _cosine_atol(run, "float64")
    np.testing.assert_allclose(got["exact_cosine"], want.loc[got.index], rtol=1e-9, atol=atol)
    z = RunValues.read(run).view(DEFAULT_VIEW).query("val_set == 'a'").set_index(["val_id", "doc_id"])
    np.testing.assert_allclose(got["exact"], z.loc[got.index, "attribution"], rtol=1e-7, atol=1e-9)
    assert set(r.table["exact_rank"]) <= {1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5}
    text = (tmp_path / "fast" / "fast.md").read_text()
    assert "exact_cosine" in text and "--docs $(cat" in text
    ids = (tmp_path / "fast" / "candidates.txt").read_text().strip().split(",")
    assert sorted(ids) == sorted(set(r.table["doc_id"]))


def test_estimates_of_every_document_are_within_the_sketchs_error(run, own_texts):
    est, view, _, _ = estimate(run, own_texts, view="checkpoint_cosine")
    table = _table(run)
    exact = table[table["val_set"] == "a"].rename(columns={"val_id": "claim_id"})
    exact = exact[exact["doc_id"].isin(json.loads((run / ck.FOLDER / ck.META).read_text())["doc_ids"])]
    both = est.merge(exact, on=["claim_id", "doc_id"])
    assert view == "checkpoint_cosine" and len(both) == len(est) == len(exact) > 10
    bound = 6 * np.sqrt(2 / 2048) + 2**-10  # count sketch at dim 2048, plus float16 storage
    assert (both["estimate"] - both["checkpoint_cosine"]).abs().max() < bound
    # and it is informative: a wrong scale or a wrong link's hashes would not track the exact cosines
    assert both["estimate"].corr(both["checkpoint_cosine"]) > 0.8

    # the standout estimate is the z of the cosine estimate against the exact reference statistics, its
    # spread (pooled: the root median variance of the index's documents) widened by the estimate's noise
    # variance 1/dim
    z, _, _, _ = estimate(run, own_texts, view="standout_checkpoint")
    ref = table[table["val_set"] == "reference"].groupby("doc_id")["checkpoint_cosine"]
    indexed = json.loads((run / ck.FOLDER / ck.META).read_text())["doc_ids"]
    pooled = np.sqrt(np.nanmedian(ref.var().reindex(indexed)))
    mu, sd = ref.mean().reindex(both["doc_id"]).to_numpy(), ref.std().reindex(both["doc_id"]).to_numpy()
    manual = (both["estimate"].to_numpy() - mu) / np.sqrt(
        np.where(sd > 0, pooled, np.nan) ** 2 + ck.NOISE / 2047
    )
    got = z.set_index(["claim_id", "doc_id"]).loc[list(zip(both["claim_id"], both["doc_id"], strict=True))]
    assert len(got) == len(manual) and np.isfinite(manual).all()
    np.testing.assert_allclose(got["estimate"].to_numpy(), manual, atol=1e-2 * np.abs(manual).max())


def test_an_older_run_is_ranked_by_the_in_run_sketch_and_says_so(run, own_texts, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run, old)
    shutil.rmtree(old / ck.FOLDER)
    _, view, notes, _ = estimate(old, own_texts, k=3)
    assert view == IN_RUN_VIEW and any(f"ranked by {IN_RUN_VIEW!r}" in n for n in notes)
    with pytest.raises(UserError, match="no checkpoint sketch index"):
        estimate(old, own_texts, view="standout_checkpoint", k=3)


def test_an_index_written_before_the_pooled_z_is_scored_against_every_reference_text(
    run, own_texts, tmp_path
):
    """An older index divided each document by its own sd; the view now pools it, so such an index is
    scored per claim from its raw vectors and the exact reference cosines, the same z as a new index."""
    old = tmp_path / "old"
    shutil.copytree(run, old)
    meta_path = old / ck.FOLDER / ck.META
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "pooled"}))
    new, _, _, _ = estimate(run, own_texts, view="standout_checkpoint")
    got, view, notes, _ = estimate(old, own_texts, view="standout_checkpoint")
    assert view == "standout_checkpoint" and "neighbours" not in new.attrs
    n_ref = len(_table(run).query("val_set == 'reference'")["val_id"].unique())
    assert any(f"against all {n_ref} reference texts" in n for n in notes), notes
    assert not any("nearest" in n for n in notes), notes
    every = sorted(_table(run).query("val_set == 'reference'")["val_id"].unique())
    assert {c: sorted(r) for c, r in got.attrs["neighbours"].items()} == {
        c: every for c in got["claim_id"].unique()
    }
    both = new.merge(got, on=["claim_id", "doc_id"])
    assert len(both) == len(new) == len(got)
    # FAISS's float32 search against the float64 product: float32 rounding over 2,048 coordinates
    atol = 2048 * np.finfo(np.float32).eps * both["estimate_x"].abs().max()
    np.testing.assert_allclose(both["estimate_y"], both["estimate_x"], rtol=0, atol=atol)


def test_an_index_of_other_checkpoints_or_dimension_is_refused(run, own_texts, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    meta_path = copy / ck.FOLDER / ck.META
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "links": meta["links"][:-1]}))
    with pytest.raises(UserError, match="the index is not this run's"):
        estimate(copy, own_texts, k=3)
    meta_path.write_text(json.dumps({**meta, "dim": 64}))
    with pytest.raises(UserError, match="sketch dimension 64 differs from the run's --sketch-dim 2048"):
        estimate(copy, own_texts, k=3)


def test_no_sketch_writes_no_checkpoint_index(corpus_dir):
    from attribution.values.manifest import Manifest

    plain = _run(corpus_dir, "nosketch", sketch=False)
    assert (plain / "checkpoint_values.parquet").is_file() and not (plain / ck.FOLDER).exists()
    assert Manifest.read(plain).indexes == {}


def test_cli_fast_under_the_default_view(run, own_texts, tmp_path):
    from attribution.cli import main

    args = ["claim", str(run), "--texts", str(own_texts), "--out", str(tmp_path / "f"), "--fast", "--k", "2"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "confirmed by their exact checkpoint similarity" in res.output and DEFAULT_VIEW in res.output
    assert len(pd.read_csv(tmp_path / "f" / "fast.csv")) == 2 * 3


def test_without_a_reference_set_the_standout_view_is_ranked_as_the_cosine(corpus_dir, own_texts):
    bare = _run(corpus_dir, "noref", reference=0)
    meta = json.loads((bare / ck.FOLDER / ck.META).read_text())
    assert set(meta["files"]) == {"raw"}
    _, view, notes, _ = estimate(bare, own_texts, view="standout_checkpoint", k=2)
    assert view == "checkpoint_cosine" and any("no fixed reference set" in n for n in notes)


@pytest.fixture(scope="module")
def wide_reference_run(corpus_dir):
    """A run with 8 reference texts, so that a claim can be measured against its nearest 5."""
    return _run(corpus_dir, "ref8", sketch_dim=2048, dtype="float64", reference=8)


def test_fast_standout_against_the_nearest_reference_texts(
    wide_reference_run, own_texts, tmp_path, monkeypatch
):
    """With more reference texts than `NEAREST_REFERENCE`, the fast z of a claim is its estimated cosine
    against the exact statistics of the reference texts nearest it (chosen by its estimated column), and
    the confirmation is the exact z against the same texts, which `reference_neighbours.json` names."""
    from attribution.values import views
    from attribution.workflows.claim_fast import NEIGHBOURS

    run = wide_reference_run
    monkeypatch.setitem(views.NEAREST_REFERENCE, "checkpoint_cosine", 5)
    monkeypatch.setattr(ck, "ESTIMATE_ROWS", 7)  # the index read back in several blocks, the last short
    table = _table(run)
    ref = table[table["val_set"] == "reference"].pivot(
        index="doc_id", columns="val_id", values="checkpoint_cosine"
    )
    assert ref.shape[1] == 8

    cos, _, _, _ = estimate(run, own_texts, view="checkpoint_cosine")
    est = cos.pivot(index="doc_id", columns="claim_id", values="estimate")
    ref = ref.reindex(est.index)
    z, view, notes, _ = estimate(run, own_texts, view="standout_checkpoint")
    assert view == "standout_checkpoint" and any("5 reference texts nearest" in n for n in notes)
    neighbours = z.attrs["neighbours"]
    assert sorted(neighbours) == sorted(est.columns)
    for claim in est.columns:
        near = views.nearest_reference(est[[claim]].to_numpy(), ref.to_numpy(), 5)[0]
        assert neighbours[claim] == [ref.columns[i] for i in near]
        mu, sd = views.reference_moments(ref.iloc[:, near].to_numpy())
        pooled = np.sqrt(np.nanmedian(sd**2))  # the index's documents: one scale for the claim
        manual = pd.Series(
            np.nan_to_num(
                (est[claim] - mu) / np.sqrt(np.where(sd > 0, pooled, np.nan) ** 2 + ck.NOISE / 2047)
            ),
            index=est.index,
        )
        got = z[z["claim_id"] == claim].set_index("doc_id")["estimate"]
        # `est` comes from FAISS's float32 search, the z from the float64 product: float32 rounding over
        # the sketch's 2,048 coordinates, at the scores' scale
        scale = np.abs(manual).max()
        np.testing.assert_allclose(
            got, manual.loc[got.index], rtol=0, atol=2048 * np.finfo(np.float32).eps * scale
        )
        assert got.is_monotonic_decreasing and len(got) == len(est)

    r = fast_claim(run, own_texts, tmp_path / "fast", k=4, progress=False)
    assert json.loads((tmp_path / "fast" / NEIGHBOURS).read_text()) == neighbours
    exact = table[table["val_set"] == "a"].pivot(index="doc_id", columns="val_id", values="checkpoint_cosine")
    every = pd.read_parquet(run / "checkpoint_values.parquet")
    every = every[every["val_set"] == "reference"].pivot(
        index="doc_id", columns="val_id", values="checkpoint_cosine"
    )
    every = every.reindex(json.loads((run / ck.FOLDER / ck.META).read_text())["doc_ids"])
    for row in r.table.itertuples():
        cols = neighbours[row.claim_id]
        mu, sd = views.reference_moments(every.loc[[row.doc_id], cols].to_numpy())
        pooled = np.sqrt(
            np.nanmedian(every[cols].var(axis=1))
        )  # over every indexed document, not the candidates
        want = np.nan_to_num(
            (exact.loc[row.doc_id, row.claim_id] - mu[0]) / (pooled if sd[0] > 0 else np.nan)
        )
        assert row.exact == pytest.approx(want, rel=1e-7, abs=1e-9)
    assert "reference texts nearest" in (tmp_path / "fast" / "fast.md").read_text()
