"""The copyright experiment end to end on a tiny real run (test-micro GPT-2, real tokenizer, real Parquet)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attribution.corpus.document import Document
from attribution.errors import UserError
from attribution.values import RunValues, rank_and_control, rank_of
from attribution.variants.thesaurus import DEFAULT_PATH
from attribution.workflows.experiment import (
    CopyrightExperiment,
    outside_pool,
    run_copyright,
    summarize,
    table_for,
)

HANDWRITTEN = Path(__file__).resolve().parents[1] / "corpora" / "handwritten"


def test_rank_of_counts_higher_scores_and_splits_ties():
    s = np.array([0.5, 2.0, 0.5, -1.0, 0.5])
    assert rank_of(s, 1) == 1.0
    assert rank_of(s, 0) == 3.0  # two ties besides itself: ranks 2, 3, 4 -> 3
    assert rank_of(s, 3) == 5.0
    assert rank_and_control(s, 1, [0, 3]) == (1.0, 4.0)  # control: the mean rank of the others
    assert np.isnan(rank_and_control(s, 1, [])[1])


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


def _handwritten(tmp_path: Path, ids: list[str]) -> tuple[Path, Path]:
    """The originals `ids` and their variants, copied line for line from corpora/handwritten."""
    originals, variants = tmp_path / "originals.jsonl", tmp_path / "variants.jsonl"
    lines = {"originals": [], "variants": []}
    for kind in lines:
        for f in sorted(HANDWRITTEN.glob(f"{kind}_*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                if (rec["meta"]["id"] if kind == "originals" else rec["meta"]["target_id"]) in ids:
                    lines[kind].append(line)
    originals.write_text("".join(x + "\n" for x in lines["originals"]), encoding="utf-8")
    variants.write_text("".join(x + "\n" for x in lines["variants"]), encoding="utf-8")
    return originals, variants


def _hw_experiment(
    tmp_path: Path, corpus: Path, originals: Path, variants: Path, **kw
) -> CopyrightExperiment:
    return CopyrightExperiment(
        corpus=[str(corpus)],
        out=tmp_path / "exp",
        pick=None,
        originals=[str(originals)],
        variants=[str(variants)],
        preset="test-micro",
        epochs=1.0,
        orders=(1,),
        device="cpu",
        run_overrides={"cache_dir": str(tmp_path / "tokens"), "progress": False, **kw},
    )


def test_handwritten_cases_train_the_originals_and_value_the_variants_as_given(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus_ids = _news_corpus(corpus, n=6, words=40)
    # one wikipedia and one legal original: the only documents of their sources, so a 2-document
    # reference set (held out of training, round-robin over sources) would take the legal one
    # if the experiment did not keep the originals out of it
    ids = ["hw-b-01", "hw-b-03"]
    originals, variants = _handwritten(tmp_path, ids)
    given = [json.loads(x) for x in variants.read_text(encoding="utf-8").splitlines()]
    assert len(given) == 8
    result = run_copyright(_hw_experiment(tmp_path, corpus, originals, variants, reference=2, batch_size=16))
    out = tmp_path / "exp"

    # the originals were trained on (after the corpus), the variants were not, and no pool was held out
    docs = pd.read_parquet(result.run_dirs[1] / "docs.parquet")["doc_id"].tolist()
    assert set(ids) <= set(docs) and not {v["id"] for v in given} & set(docs)
    assert len(docs) == len(corpus_ids) + len(ids) - 2  # only the reference set is held out
    assert (out / "variants" / "heldout_ids.txt").read_text() == ""
    ranks = pd.read_csv(out / "ranks.csv")
    assert ranks["target_seen"].all()
    # the variants are the hand-written texts, one ranks.csv row each
    assert list(ranks["id"]) == [v["id"] for v in given]
    assert list(ranks["target_id"]) == [v["meta"]["target_id"] for v in given]
    written = {
        json.loads(x)["id"]: json.loads(x)["text"]
        for f in (out / "variants").glob("*.jsonl")
        for x in f.read_text(encoding="utf-8").splitlines()
    }
    assert written == {v["id"]: v["text"] for v in given}

    table = pd.read_csv(out / "table.csv")
    assert list(table["variant"]) == ["partial", "paraphrase", "significant", "similar"]
    n_train = len(docs)
    for method in ("irs_order1", "irs_order1_contrast", "bm25", "semantic", "containment"):
        assert ranks[method].between(1, n_train).all(), method
    # control: the other original's rank for the same text (two originals: exactly one other)
    other = {ids[0]: ids[1], ids[1]: ids[0]}
    ev = pd.read_parquet(result.run_dirs[1] / "example_values.parquet")
    row = ranks.iloc[0]
    g = ev[(ev["val_set"] == row["variant"]) & (ev["val_id"] == row["id"])]
    vals = dict(zip(g["doc_id"], g["value"], strict=True))
    scores = np.array([vals.get(d, 0.0) for d in docs])
    assert row["irs_order1"] == rank_of(scores, docs.index(row["target_id"]))
    assert row["control_irs_order1"] == rank_of(scores, docs.index(other[row["target_id"]]))
    # a verbatim excerpt is found by its 8-grams; a hand-written "similar" text has few in common
    part = ranks[ranks["variant"] == "partial"]
    assert (part["containment"] == 1).all()
    sim = ranks[ranks["variant"] == "similar"]
    assert (sim["containment_8"] < part["containment_8"].min()).all()

    # the subset table is the full table's code on the subset's rows: check it against numbers made here
    sub_table, markdown = table_for(out, ["hw-b-01"])
    mine = ranks[ranks["target_id"] == "hw-b-01"]
    assert list(sub_table["n"]) == [1, 1, 1, 1]
    for method in ("irs_order1", "irs_order1_per_token", "irs_order1_contrast", "bm25", "containment"):
        by_kind = mine.groupby("variant")[method].mean().round(2)
        assert (
            dict(zip(sub_table["variant"], sub_table[f"{method}_mean_rank"], strict=True))
            == by_kind.to_dict()
        )
        ctrl = (
            mine.groupby("variant")[f"control_{method}"].mean().round(2) if method.startswith("irs") else None
        )
        if ctrl is not None:
            got = dict(zip(sub_table["variant"], sub_table[f"control_{method}_mean_rank"], strict=True))
            assert got == ctrl.to_dict()
    assert "matching `hw-b-01` (1 originals, 4 variants)" in markdown
    # every original's rank shows in the views tables
    cell = f"{mine.iloc[0]['irs_order1']:.1f} [{mine.iloc[0]['irs_order1']:g}]"
    assert cell in markdown
    # with no subset, the recomputed table is the one the experiment wrote
    full, _ = table_for(out)
    pd.testing.assert_frame_equal(full, table, check_dtype=False)
    assert summarize(ranks, n_train).equals(full)


def test_handwritten_bad_inputs_are_one_line_errors_naming_the_line(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus_ids = _news_corpus(corpus, n=3)
    originals, variants = _handwritten(tmp_path, ["hw-a-01", "hw-a-02"])

    # a variant whose original is not among the originals
    lines = variants.read_text(encoding="utf-8").splitlines()
    rec = json.loads(lines[5])
    rec["meta"]["target_id"] = "hw-a-99"
    lines[5] = json.dumps(rec)
    bad_target = tmp_path / "bad_target.jsonl"
    bad_target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad_target.jsonl:6: meta.target_id 'hw-a-99' is not an original$"):
        run_copyright(_hw_experiment(tmp_path, corpus, originals, bad_target))

    # an unknown kind
    rec["meta"].update(target_id="hw-a-01", variant="rewrite")
    lines[5] = json.dumps(rec)
    bad_target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad_target.jsonl:6: meta.variant 'rewrite' is not a kind"):
        run_copyright(_hw_experiment(tmp_path, corpus, originals, bad_target))

    # an original whose id is a corpus document's
    lines = originals.read_text(encoding="utf-8").splitlines()
    rec = json.loads(lines[1])
    rec["meta"]["id"] = corpus_ids[2]
    lines[1] = json.dumps(rec)
    clash = tmp_path / "clash.jsonl"
    clash.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"clash.jsonl:2: meta.id 'news/02' is already a --corpus document"):
        run_copyright(_hw_experiment(tmp_path, corpus, clash, variants))

    # one of the two without the other, through the command line: one `error:` line, status 2
    from click.testing import CliRunner

    from attribution.cli import main

    for flag, path in (("--originals", originals), ("--variants", variants)):
        res = CliRunner().invoke(
            main,
            [
                "experiment",
                "copyright",
                "--corpus",
                str(corpus),
                "--out",
                str(tmp_path / "o"),
                flag,
                str(path),
            ],
        )
        assert res.exit_code == 2, res.output
        assert (
            res.output.strip()
            == "error: --originals and --variants go together: give both (hand-written cases) or neither"
        )
    res = CliRunner().invoke(
        main,
        [
            "experiment",
            "copyright",
            "--corpus",
            str(corpus),
            "--out",
            str(tmp_path / "o"),
            "--pick",
            "2",
            "--originals",
            str(originals),
            "--variants",
            str(variants),
        ],
    )
    assert res.exit_code == 2 and "--pick and --ids choose originals from the corpus" in res.output


def test_experiment_table_cli_prints_a_subset(tmp_path):
    """`attribution experiment table` on a hand-made ranks.csv: the subset's numbers, not the others'."""
    from click.testing import CliRunner

    from attribution.cli import main

    out = tmp_path / "exp"
    out.mkdir()
    rows = []
    for t, (r1, r2) in {"hw-a-01": (1, 5), "hw-b-01": (3, 7), "hw-b-02": (2, 9)}.items():
        for kind, r in (("partial", r1), ("similar", r2)):
            rows.append(
                {
                    "variant": kind,
                    "id": f"{t}-{kind}",
                    "target_id": t,
                    "containment_8": 0.5,
                    "jaccard_3": 0.3,
                    "cosine_minilm": 0.8,
                    "irs_order1": r,
                    "control_irs_order1": 10.0,
                    "target_seen": True,
                    "bm25": 1,
                    "semantic": 1,
                    "containment": 1,
                }
            )
    pd.DataFrame(rows).to_csv(out / "ranks.csv", index=False)
    meta = {"n_train_docs": 20, "preset": "test-micro", "steps": 4, "optimizer": "adamw", "seed": 0}
    (out / "experiment.json").write_text(json.dumps(meta))
    res = CliRunner().invoke(
        main, ["experiment", "table", str(out), "--targets", "hw-b-*", "--csv", str(tmp_path / "b.csv")]
    )
    assert res.exit_code == 0, res.output
    assert "| value | 2.5 [3, 2] | 8.0 [7, 9] | 10.0 |" in res.output
    table = pd.read_csv(tmp_path / "b.csv")
    assert list(table["irs_order1_mean_rank"]) == [2.5, 8.0] and list(table["n"]) == [2, 2]
    bad = CliRunner().invoke(main, ["experiment", "table", str(out), "--targets", "hw-c-*"])
    assert bad.exit_code == 2 and "no variant's target id matches 'hw-c-*'" in bad.output


def test_copyright_cli_hands_reference_and_batch_size_to_the_run(tmp_path, monkeypatch):
    """`--reference N` (the reference-size lever of the held-out protocol) and `--batch-size` reach the
    run's config; without `--reference` the run keeps its preset's (`--batch-size` defaults to 32)."""
    from click.testing import CliRunner

    from attribution.cli import main
    from attribution.workflows import experiment

    seen = []

    def fake(exp):
        seen.append(exp.run_overrides)
        raise UserError("stopped before training")

    monkeypatch.setattr(experiment, "run_copyright", fake)
    base = ["experiment", "copyright", "--corpus", "builtin:20", "--out", str(tmp_path / "o"), "--pick", "2"]
    for extra, want in (
        ([], {"batch_size": 32}),
        (["--reference", "48"], {"batch_size": 32, "reference": 48}),
        (["--reference", "0", "--batch-size", "8"], {"reference": 0, "batch_size": 8}),
    ):
        res = CliRunner().invoke(main, [*base, *extra])
        assert res.exit_code == 2 and "stopped before training" in res.output, res.output
        assert seen[-1] == want
