"""`attribution curate` end to end: a small real valued run, then three real plain retrains.

The corpus mixes real news articles (gensim's Lee corpus) with random hex strings, from two sources;
the validation texts are a partial copy and a light rewrite of one training article, and two unseen
articles.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from train_fixtures import lee_articles, train_micro

from attribution.values import Manifest


def make_tiny_run(root: Path, steps: int = 8) -> Path:
    """A real `train_and_value` run on a few dozen documents with the `test-micro` model.

    The validation set holds two unseen articles, a partial copy and a paraphrase-like rewrite of a
    training article, so a reviewer's notebook has something to find.
    """
    news = lee_articles()
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for i, text in enumerate(news[:18]):
            meta = {"pile_set_name": "news", "owner": ["Daily Planet", "Gazette", "Courier"][i % 3]}
            fh.write(json.dumps({"id": f"news-{i}", "text": text, "meta": meta}) + "\n")
        for i in range(6):
            noise = " ".join(rng.bytes(6).hex() for _ in range(60))
            fh.write(
                json.dumps(
                    {
                        "id": f"noise-{i}",
                        "text": noise,
                        "meta": {"pile_set_name": "noise", "owner": "Scraper Ltd"},
                    }
                )
                + "\n"
            )
    target = news[8].split()  # news-8 is in several batches of this seed's 8 steps
    # a light rewrite: every 10th word replaced, so runs of 9 words survive (8-gram evidence to highlight)
    light = [("indeed" if k % 10 == 9 else w) for k, w in enumerate(target[:80])]
    val = [
        {
            "id": "copy-8",
            "text": "Please quote the article. " + " ".join(target[:60]),
            "meta": {"variant": "partial_copy", "target_id": "news-8"},
        },
        {"id": "para-8", "text": " ".join(light), "meta": {"variant": "paraphrase", "target_id": "news-8"}},
        {"id": "unseen-a", "text": news[100], "meta": {"variant": "unrelated"}},
        {"id": "unseen-b", "text": news[101], "meta": {"variant": "unrelated"}},
    ]
    return train_micro(root, val, steps)


@pytest.mark.slow
def test_curate_end_to_end(tmp_path):
    """`--drop bottom:25` (a run this short gives every document a positive value, so `negative` would
    drop nothing; the negative rule is checked on given values in test_curate.py)."""
    from attribution.cli import main

    run = make_tiny_run(tmp_path)
    dv = pd.read_parquet(run / "doc_values.parquet")
    docs = pd.read_parquet(run / "docs.parquet")
    totals = dv.assign(doc_id=dv["doc_id"].astype(str)).groupby("doc_id")["value"].sum()
    totals = totals.reindex(docs["doc_id"].astype(str)).fillna(0.0)
    n_drop = round(len(docs) * 0.25)
    lowest = set(totals.reset_index().sort_values(["value", "doc_id"]).head(n_drop)["doc_id"])
    out = tmp_path / "cur"
    args = [
        "curate",
        str(run),
        "--drop",
        "bottom:25",
        "--out",
        str(out),
        "--eval-every",
        "2",
        "--smooth",
        "1",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_dropped"] == n_drop
    assert summary["dropped_fraction"] == pytest.approx(n_drop / len(docs))
    assert summary["negative_fraction"] == pytest.approx(float((totals < 0).mean()))
    assert set(pd.read_csv(out / "dropped.csv")["doc_id"].astype(str)) == lowest
    assert len(pd.read_csv(out / "random_dropped.csv")) == n_drop
    # each retrain really left its documents out, on the same number of steps
    for name, n_out in (("baseline", 0), ("curated", n_drop), ("random", n_drop)):
        manifest = Manifest.read(out / "runs" / name).to_dict()
        assert manifest["corpus"]["excluded_ids"] == n_out
        assert manifest["training"]["total_steps"] == 8
    curves = pd.read_csv(out / "curves.csv").set_index("step")
    assert list(curves.index) == [0, 2, 4, 6, 8]
    # the baseline is a plain retrain of RUN: same seed and data, hence the same losses as the valued run
    run_log = pd.read_csv(run / "train_log.csv").set_index("step")["val_loss[news]"].dropna()
    assert curves["baseline"].loc[run_log.index].to_numpy() == pytest.approx(run_log.to_numpy(), rel=1e-5)
    assert not np.allclose(curves["curated"].iloc[1:], curves["baseline"].iloc[1:])
    assert summary["target"] == pytest.approx(curves["baseline"].iloc[-1])
    assert summary["steps"]["baseline"] is not None and summary["steps"]["baseline"] <= 8
    by_source = pd.read_csv(out / "dropped_sources.csv").set_index("source")
    assert by_source["dropped"].sum() == n_drop
    assert (out / "curves.png").stat().st_size > 0 and "random-drop" in (out / "summary.md").read_text()
    # rerunning reuses the finished retrains instead of training again
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "reusing the finished retrain" in again.output


def test_curate_rejects_bad_input(tmp_path):
    from attribution.cli import main

    res = CliRunner().invoke(
        main, ["curate", str(tmp_path / "nope"), "--drop", "negative", "--out", str(tmp_path)]
    )
    assert res.exit_code == 2 and "no such run directory" in res.output
    res = CliRunner().invoke(main, ["curate", str(tmp_path), "--drop", "top:3", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--drop must be" in res.output
