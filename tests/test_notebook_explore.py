"""Unit tests of `attribution.workflows.explore` (the notebook's API) on a hand-made run directory.

The directory follows the run-directory schema of docs/architecture.md, with values chosen so every
expected figure can be worked out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from attribution.errors import UserError
from attribution.workflows import explore

ORIGINAL = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity."
)
OTHER = "The quick brown fox jumps over the lazy dog while the farmer sleeps under an old oak tree."
CODE = "def add(a, b):\n    return a + b\n\nclass Point:\n    pass\n"
# the validation text copies ORIGINAL's first 16 words, then goes its own way
PARTIAL = "Answer the question. It was the best of times, it was the worst of times, it was the age of wisdom, and so on."


def make_run(root: Path) -> Path:
    run = root / "run"
    (run / "val_sets").mkdir(parents=True)
    docs = pd.DataFrame(
        {
            "doc_id": ["d0", "d1", "d2", "d3"],
            "source": ["books", "web", "code", "web"],
            "owner": ["alice", "bob", "carol", "bob-shell"],
            "license": ["pd", None, "psf", None],
            "n_tokens": [40, 20, 15, 25],
            "n_seqs": [1, 1, 1, 1],
            "text": [ORIGINAL, OTHER, CODE, OTHER + " Again."],
        }
    )
    docs.to_parquet(run / "docs.parquet")
    dv = pd.DataFrame(
        {
            "doc_id": ["d0", "d1", "d2", "d3", "d0", "d1", "d2", "d3"],
            "source": ["books", "web", "code", "web"] * 2,
            "owner": ["alice", "bob", "carol", "bob-shell"] * 2,
            "val_set": ["copyright"] * 4 + ["general"] * 4,
            "value": [3.0, -1.0, 0.5, 1.0, 1.0, 1.0, -2.0, 0.0],
        }
    )
    dv["value_normalized"] = dv["value"] / 10
    dv.to_parquet(run / "doc_values.parquet")
    ev = pd.DataFrame(
        {
            "doc_id": ["d0", "d1", "d2", "d3", "d0", "d1", "d2", "d3"],
            "val_set": ["copyright"] * 8,
            "val_id": ["v-partial"] * 4 + ["v-topic"] * 4,
            "value": [2.0, -0.5, 0.1, 0.3, 1.0, -0.5, 0.4, 0.7],
        }
    )
    ev.to_parquet(run / "example_values.parquet")
    sv = pd.DataFrame(
        {
            "window_start": [0, 0, 0, 10, 10, 10],
            "window_end": [10, 10, 10, 20, 20, 20],
            "source": ["books", "web", "code"] * 2,
            "val_set": ["copyright"] * 6,
            "value": [2.0, 1.0, 0.5, 1.0, -1.0, 0.0],
            "value_normalized": [0.2, 0.1, 0.05, 0.5, -0.5, 0.0],
        }
    )
    sv.to_parquet(run / "stage_values.parquet")
    pd.DataFrame(
        {
            "step": [10, 20],
            "lr": [1e-3, 1e-3],
            "train_loss": [5.0, 4.0],
            "val_loss[copyright]": [5.5, 4.5],
            "tokens_per_s": [100, 100],
        }
    ).to_csv(run / "train_log.csv", index=False)
    with open(run / "val_sets" / "copyright.jsonl", "w") as fh:
        fh.write(
            json.dumps(
                {"id": "v-partial", "text": PARTIAL, "meta": {"variant": "partial_copy", "target_id": "d0"}}
            )
            + "\n"
        )
        fh.write(
            json.dumps(
                {
                    "id": "v-topic",
                    "text": "A story about two cities in a revolution.",
                    "meta": {"variant": "similar_topic", "target_id": "d0"},
                }
            )
            + "\n"
        )
    (run / "manifest.json").write_text(json.dumps({"config": {"steps": 20}, "default_view": "value"}))
    return run


@pytest.fixture()
def run(tmp_path):
    return explore.load_run(make_run(tmp_path))


def test_default_run_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTRIBUTION_RUN", str(tmp_path))
    assert explore.default_run_dir() == tmp_path
    monkeypatch.delenv("ATTRIBUTION_RUN")
    assert explore.default_run_dir().parts[-2:] == ("runs", "demo")


def test_load_run_rejects_non_run(tmp_path):
    with pytest.raises(UserError, match="no such run directory"):
        explore.load_run(tmp_path / "missing")
    with pytest.raises(UserError, match="docs.parquet"):
        explore.load_run(tmp_path)


def test_doc_totals_and_sources(run):
    totals = explore.doc_totals(run).set_index("doc_id")["value"]
    assert totals.to_dict() == {"d0": 4.0, "d1": 0.0, "d2": -1.5, "d3": 1.0}
    table = explore.source_table(run, "copyright").set_index("source")
    assert table.loc["web", "value"] == 0.0 and table.loc["web", "hurt"] == 1
    # positive value: books 3, web 1 (d3), code 0.5 -> shares 3/4.5, 1/4.5, 0.5/4.5
    assert table.loc["books", "share_of_positive_value"] == pytest.approx(3 / 4.5)
    assert table["share_of_positive_value"].sum() == pytest.approx(1.0)
    with pytest.raises(UserError, match="unknown validation set"):
        explore.source_table(run, "nope")


def test_source_shares_over_time(run):
    wide = explore.source_shares_over_time(run, normalized=True)
    assert list(wide.index) == [10, 20]
    assert wide.loc[20, "web"] == pytest.approx(-0.5)
    raw = explore.source_shares_over_time(run, "copyright")
    assert raw.loc[10, "books"] == 2.0


def test_top_contributors_ranks_and_evidence(run):
    val_id = explore.pick_validation(run, variant="partial_copy")
    assert val_id == "v-partial"
    top = explore.top_contributors(run, val_id, k=2)
    assert list(top["doc_id"]) == ["d0", "d3"]
    assert list(top["rank"]) == [1, 2]
    assert top.loc[0, "shapley"] == 2.0
    # the copied opening is a long shared run of words with the original; the other document shares
    # at most a stray word or two (the longest common word run, as in `attribution compare`)
    assert top.loc[0, "longest_shared_span"] >= 16
    assert top.loc[1, "longest_shared_span"] < 8
    assert top.loc[0, "ngram8_containment"] > 0.3
    assert top.loc[0, "semantic_similarity"] > top.loc[1, "semantic_similarity"]
    with pytest.raises(UserError, match="unknown view"):
        explore.top_contributors(run, val_id, view="nope")


def test_highlight_escapes_and_marks():
    text = ORIGINAL + " <script>"
    marked = explore.highlight(text, [(0, 15)])
    assert marked.startswith("<mark>It was the best</mark>")
    assert "&lt;script&gt;" in marked and "<script>" not in marked
    cut = explore.highlight("x" * 5000 + ORIGINAL, [(5000, 5015)], max_chars=1000)
    assert cut.startswith("… ") and "<mark>It was the best</mark>" in cut and cut.endswith(" …") is False


def test_side_by_side_html(run):
    page = explore.side_by_side(run, "v-partial", "d0")
    assert "<mark>" in page and "Shapley +2" in page and "alice" in page


def test_royalty_table_matches_report_rule(run):
    by_owner = explore.royalty_table(run, pool=900.0, val_set="copyright").set_index("owner")
    # positive-share per document: d0 3, d1 -1 -> 0, d2 0.5, d3 1 -> pool over 4.5
    assert by_owner.loc["alice", "payout"] == pytest.approx(600.0)
    assert by_owner.loc["bob", "payout"] == 0.0
    assert by_owner.loc["bob-shell", "payout"] == pytest.approx(200.0)
    assert by_owner["payout"].sum() == pytest.approx(900.0)
    by_source = explore.royalty_table(run, pool=900.0, by="source", val_set="copyright").set_index("source")
    assert by_source.loc["web", "payout"] == pytest.approx(200.0)
    with pytest.raises(UserError, match="unknown royalty rule"):
        explore.royalty_table(run, rule="nope")


def test_export_selection(run, tmp_path):
    top = explore.top_contributors(run, "v-partial", k=3, evidence=False)
    path = explore.export_selection(top.head(2), tmp_path / "out" / "sel.csv")
    back = pd.read_csv(path)
    assert list(back["doc_id"]) == ["d0", "d3"]
    with pytest.raises(UserError, match="nothing selected"):
        explore.export_selection(top.head(0), tmp_path / "x.csv")
