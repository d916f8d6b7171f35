"""The copyright experiment end to end on a tiny real run (test-micro GPT-2, real tokenizer, real Parquet)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attribution.corpus.document import Document
from attribution.errors import UserError
from attribution.values import RunValues
from attribution.variants.thesaurus import DEFAULT_PATH
from attribution.workflows.experiment import CopyrightExperiment, outside_pool, rank_of, run_copyright


def test_rank_of_counts_higher_scores_and_splits_ties():
    s = np.array([0.5, 2.0, 0.5, -1.0, 0.5])
    assert rank_of(s, 1) == 1.0
    assert rank_of(s, 0) == 3.0  # two ties besides itself: ranks 2, 3, 4 -> 3
    assert rank_of(s, 3) == 5.0


def _news_corpus(path: Path, n: int = 14, words: int = 70) -> list[str]:
    """Real ABC news articles from gensim's test data, cut short so a micro run covers them in an epoch."""
    import gensim

    src = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
    articles = [
        a for a in src.read_text(encoding="utf-8", errors="replace").splitlines() if len(a.split()) > words
    ]
    ids = []
    with open(path, "w", encoding="utf-8") as fh:
        for i, article in enumerate(articles[:n]):
            doc_id = f"news/{i:02d}"
            ids.append(doc_id)
            text = " ".join(article.split()[:words])
            fh.write(json.dumps({"id": doc_id, "text": text, "meta": {"pile_set_name": "news"}}) + "\n")
    return ids


@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_PATH.is_file(), reason="Debian mythes-en-us is not installed")
def test_copyright_experiment_writes_table_ranks_and_plot(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    ids = _news_corpus(corpus)
    exp = CopyrightExperiment(
        corpus=[str(corpus)],
        out=tmp_path / "exp",
        pick=None,
        ids=ids[:2],
        preset="test-micro",
        steps=None,
        epochs=1.0,
        orders=(1, 2),
        pool_fraction=0.25,
        device="cpu",
        seed=0,
        run_overrides={"cache_dir": str(tmp_path / "tokens"), "progress": False},
    )
    result = run_copyright(exp)
    out = tmp_path / "exp"
    for name in (
        "table.csv",
        "table.md",
        "ranks.csv",
        "ranks.png",
        "experiment.json",
        "variants/partial.jsonl",
        "variants/similar.jsonl",
        "variants/heldout_ids.txt",
    ):
        assert (out / name).is_file(), name

    table = pd.read_csv(out / "table.csv")
    assert list(table["variant"]) == ["partial", "paraphrase", "significant", "similar"]
    ranks = pd.read_csv(out / "ranks.csv")
    assert len(ranks) == 8 and set(ranks["target_id"]) == set(ids[:2])
    heldout = (out / "variants" / "heldout_ids.txt").read_text().split()
    n_train = int(table["n_train_docs"].iloc[0])
    assert n_train == len(ids) - len(heldout)  # the pool was kept out of training
    for method in ("irs_order1", "irs_order2", "bm25", "semantic", "containment"):
        assert ranks[method].between(1, n_train).all(), method
    assert ranks["target_seen"].all()  # one epoch trains every original
    # the text baselines find a verbatim excerpt at once; a similar-topic document shares no 8-gram with it
    part = ranks[ranks["variant"] == "partial"]
    assert (part["containment"] == 1).all() and (part["bm25"] == 1).all()
    # the In-Run Shapley ranks come from the run's per-example values: recompute one by hand
    ev = pd.read_parquet(result.run_dirs[1] / "example_values.parquet")
    row = ranks.iloc[0]
    g = ev[(ev["val_set"] == row["variant"]) & (ev["val_id"] == row["id"])]
    vals = dict(zip(g["doc_id"], g["value"], strict=True))
    docs = pd.read_parquet(result.run_dirs[1] / "docs.parquet")["doc_id"].tolist()
    by_hand = rank_of(np.array([vals.get(d, 0.0) for d in docs]), docs.index(row["target_id"]))
    assert row["irs_order1"] == by_hand
    # every attribution view gets its own rank column, recomputed here for the default view
    from attribution.values.views import DEFAULT_VIEW

    view_col = f"irs_order2_{DEFAULT_VIEW}"
    assert ranks[view_col].between(1, n_train).all()
    ev2 = RunValues.read(result.run_dirs[2]).view()  # the default view, computed when the run is read
    g2 = ev2[(ev2["val_set"] == row["variant"]) & (ev2["val_id"] == row["id"])]
    att = dict(zip(g2["doc_id"], g2["attribution"], strict=True))
    assert row[view_col] == rank_of(np.array([att.get(d, 0.0) for d in docs]), docs.index(row["target_id"]))
    assert f"**{DEFAULT_VIEW}** (default)" in result.markdown
    assert f"{view_col}_mean_rank" in table.columns
    assert "In-Run Shapley 1st order, value" in result.markdown and "Paper" in result.markdown

    # a rerun with the same settings reuses the finished training runs
    stamp = (result.run_dirs[1] / "example_values.parquet").stat().st_mtime_ns
    run_copyright(exp)
    assert (result.run_dirs[1] / "example_values.parquet").stat().st_mtime_ns == stamp


def test_exact_variants_are_refused_with_the_reason(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    ids = _news_corpus(corpus, n=4)
    exp = CopyrightExperiment(
        corpus=[str(corpus)], out=tmp_path / "exp", pick=None, ids=ids[:1], kinds="exact,partial"
    )
    with pytest.raises(UserError, match="identical to a validation text"):
        run_copyright(exp)


def test_outside_pool_keeps_only_documents_never_trained_on():
    train = [Document("a", "alpha text", "news"), Document("b", "beta text", "news")]
    cands = [
        Document("a", "alpha text", "news"),
        Document("b2", " beta text ", "news"),  # same id / same text
        Document("c", "gamma text", "news"),
    ]
    assert [d.doc_id for d in outside_pool(cands, train)] == ["c"]
    with pytest.raises(UserError, match="no document outside the training corpus"):
        outside_pool(cands[:2], train)
