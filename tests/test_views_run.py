"""The attribution views on real (tiny) runs: a text's default-view values do not depend on which other
texts the run valued, and the royalty numbers do not depend on the view at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attribution.train import RunConfig, train_and_value
from attribution.values import RunValues
from attribution.values.views import DEFAULT_VIEW, REFERENCE_SET
from attribution.workflows import checkpoint_similarity, explore
from tests.train_fixtures import write_corpus, write_val


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("views_run")
    write_corpus(tmp)
    write_val(tmp, "a", 3)
    write_val(tmp, "b", 4, seed=9)
    return tmp


def _run(folder, name: str, val: dict[str, str], **kw):
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
        **kw,
    )
    return train_and_value(cfg)


@pytest.fixture(scope="module")
def runs(folder):
    out = _run(folder, "alone", {"a": "a"}), _run(folder, "more", {"a": "a", "b": "b"})
    for run in out:
        checkpoint_similarity.write(run, checkpoint_similarity.for_run(run))
    return out


def _of_a(run, view: str) -> pd.Series:
    ev = RunValues.read(run).view(view)
    ev = ev[ev["val_set"] == "a"].set_index(["val_id", "doc_id"]).sort_index()
    return ev["attribution"]


@pytest.mark.parametrize(
    "view", [DEFAULT_VIEW, "standout", "contrast_per_token", "checkpoint_cosine", "standout_checkpoint"]
)
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
    for view in ["value", DEFAULT_VIEW, "standout", "contrast_per_token", "standout_checkpoint"]:
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


def test_checkpoint_cosines_are_read_with_the_example_rows(runs):
    """The checkpoint table covers every trained document and every per-example text (the reference set
    too), and `RunValues` joins it to the right rows: a text's column equals the table's, key by key."""
    run = runs[1]
    table = pd.read_parquet(run / checkpoint_similarity.TABLE)
    ev = RunValues.read(run).examples()
    assert set(table["val_set"]) == {"a", "b", REFERENCE_SET}
    assert len(table) == len(table.drop_duplicates(["doc_id", "val_set", "val_id"]))
    got = ev.set_index(["doc_id", "val_set", "val_id"])["checkpoint_cosine"].dropna()
    want = table.set_index(["doc_id", "val_set", "val_id"])["checkpoint_cosine"].reindex(got.index)
    assert len(got) == len(ev) and np.abs(want.to_numpy()).max() > 0
    np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())
    assert (np.abs(table["checkpoint_cosine"]) <= 1 + 1e-12).all()


def test_a_run_without_a_replay_chain_is_named(folder, tmp_path):
    import shutil

    from attribution.errors import UserError

    run = tmp_path / "run"
    shutil.copytree(folder / "alone", run)
    shutil.rmtree(run / "replay")
    with pytest.raises(UserError, match="kept no replay chain"):
        checkpoint_similarity.for_run(run)


def test_the_documents_gradients_use_the_sequences_the_loop_trained_on(runs):
    """`trained_sequences` replays the loop's sampler: per document, the stream positions it takes are
    the `n_seen` the value store counted (repeats included), and a set of them each once."""
    from attribution.train import loop
    from attribution.train.distributed import DistInfo
    from attribution.workflows.claim_fast import _config

    run = runs[0]
    cfg = _config(RunValues.read(run).run.manifest())
    data = loop.load_training(cfg, loop.load_validation(cfg), Path(cfg.cache_dir), DistInfo())
    taken = cfg.total_steps(len(data.train_seqs)) * cfg.batch_size
    stream = loop.Sampler(data.train_seqs, cfg.seed).take(0, taken)
    doc_ids = data.docs["doc_id"].astype(str).to_numpy()
    counted = pd.Series(doc_ids[data.store_row_of_seq[stream]]).value_counts().sort_index()
    dv = RunValues.read(run).to_dataframe().set_index("doc_id")["n_seen"]
    pd.testing.assert_series_equal(counted, dv[dv > 0].sort_index(), check_names=False)
    np.testing.assert_array_equal(
        checkpoint_similarity.trained_sequences(data.train_seqs, cfg.seed, taken), np.unique(stream)
    )


def test_without_the_checkpoint_pass_the_default_is_the_in_run_view(folder):
    """`--no-checkpoint-view`: no checkpoint table, and the manifest names the in-run default, which
    readers then show."""
    from attribution.values.manifest import Manifest
    from attribution.values.views import IN_RUN_VIEW

    run = _run(folder, "no_ckpt", {"a": "a"}, checkpoint_view=False)
    assert not (run / checkpoint_similarity.TABLE).exists()
    assert Manifest.read(run).default_view == IN_RUN_VIEW != DEFAULT_VIEW
    assert RunValues.read(run).view().attrs["view"] == IN_RUN_VIEW
