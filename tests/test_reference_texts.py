"""`--reference-texts`: texts in the register of the claims, added whole to a run's fixed reference set.

Why (issue 13): the standout views ask whether a document helps *this* text more than text in general.
A reference drawn only from the corpus holds no text in the claims' register, so any document of that
register stands out for any such text. These tests check the plumbing on real tiny runs: the texts join
the reference (valued whole, in-run and at the kept checkpoints), nothing else about the run changes,
the standout view reads them, a claim sees the same reference, and bad input fails in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attribution.errors import UserError
from attribution.train import RunConfig, train_and_value
from tests.train_fixtures import write_corpus, write_val

TEXT_IDS = ["reg0", "reg1", "reg2"]


def _cfg(tmp_path, out: str, **kw) -> RunConfig:
    base = {
        "corpus": [str(tmp_path / "corpus.jsonl")],
        "val": {"a": str(tmp_path / "a.jsonl"), "b": str(tmp_path / "b.jsonl")},
        "out": str(tmp_path / out),
        "preset": "test-micro",
        "steps": 4,
        "seed": 7,
        "device": "cpu",
        "cache_dir": str(tmp_path / "cache"),
        "progress": False,
        "reference": 4,
        "dtype": "float64",  # AdamW-aware values amplify rounding at step 1 (1/(|g| + eps)): compare exactly
    }
    return RunConfig(**{**base, **kw})


def _texts(tmp_path, rows: list[dict], name: str = "register.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _register(tmp_path) -> str:
    words = "the tribunal shall hear every dispute between the parties in the seat of arbitration".split()
    rows = [{"id": i, "text": " ".join(words[k:] + words[:k])} for k, i in enumerate(TEXT_IDS)]
    rows[1]["text"] = " ".join(words * 6)  # longer than one 32-token sequence: valued whole
    return _texts(tmp_path, rows)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("reftexts")
    write_corpus(tmp_path)
    write_val(tmp_path, "a", 3)
    write_val(tmp_path, "b", 2, seed=5)
    texts = _register(tmp_path)
    base = train_and_value(_cfg(tmp_path, "base"))
    withr = train_and_value(_cfg(tmp_path, "withr", reference_texts=(texts,)))
    return tmp_path, base, withr


def test_texts_join_the_reference_whole_and_nothing_else_changes(runs):
    _, base, withr = runs
    ref = [json.loads(x) for x in (withr / "val_sets" / "reference.jsonl").read_text().splitlines()]
    ref0 = [json.loads(x) for x in (base / "val_sets" / "reference.jsonl").read_text().splitlines()]
    assert [r["id"] for r in ref] == [r["id"] for r in ref0] + TEXT_IDS  # the sampled four, then the texts
    assert {r["meta"]["valued_on"] for r in ref[len(ref0) :]} == {"whole text"}
    ev = {k: pd.read_parquet(run / "example_values.parquet") for k, run in (("base", base), ("with", withr))}
    rows = ev["with"][ev["with"]["val_set"] == "reference"]
    n_docs = ev["with"]["doc_id"].nunique()
    assert set(rows["val_id"]) == {r["id"] for r in ref} and len(rows) == n_docs * len(ref)
    # the texts are never trained on, and the run trains and values exactly as without them
    dv = {k: pd.read_parquet(run / "doc_values.parquet") for k, run in (("base", base), ("with", withr))}
    assert set(dv["with"]["doc_id"]) == set(dv["base"]["doc_id"]) and not set(TEXT_IDS) & set(
        dv["with"]["doc_id"]
    )
    keys = ["doc_id", "val_set", "val_id"]
    both = ev["base"].merge(ev["with"], on=keys, suffixes=("", "_with"))
    assert len(both) == len(ev["base"])
    scale = np.abs(both["value"]).max()
    assert scale > 0  # the same numbers up to float64 summation order (the sets' columns are scored together)
    np.testing.assert_allclose(both["value_with"], both["value"], rtol=0, atol=1e-9 * scale)
    # the checkpoint pass compares every document with the texts too
    ck = pd.read_parquet(withr / "checkpoint_values.parquet")
    assert set(TEXT_IDS) <= set(ck.loc[ck["val_set"] == "reference", "val_id"])


def test_the_standout_view_reads_the_texts(runs):
    from attribution.values import RunValues

    _, base, withr = runs
    views = {k: RunValues.read(run).with_views() for k, run in (("base", base), ("with", withr))}
    ev = views["with"]
    doc = ev["doc_id"].iloc[0]
    mine = ev[ev["doc_id"] == doc]
    reference = mine.loc[mine["val_set"] == "reference", "checkpoint_cosine"].to_numpy()
    assert len(reference) == 4 + len(TEXT_IDS)
    row = mine[(mine["val_set"] == "a") & (mine["val_id"] == "a0")].iloc[0]
    # the pooled z (`views.POOLED_SCALE`): one scale for the text, the root median variance of every
    # document's reference cosines
    every = ev[ev["val_set"] == "reference"].groupby("doc_id")["checkpoint_cosine"].var()
    want = (row["checkpoint_cosine"] - reference.mean()) / np.sqrt(every.median())
    assert row["view_standout_checkpoint"] == pytest.approx(want, rel=1e-9)
    old = views["base"]
    old_row = old[(old["doc_id"] == doc) & (old["val_set"] == "a") & (old["val_id"] == "a0")].iloc[0]
    assert old_row["view_standout_checkpoint"] != pytest.approx(want, rel=1e-3)  # the texts changed it


def test_a_claim_is_valued_next_to_the_same_reference(runs):
    from attribution.train import loop
    from attribution.values.rundir import RunDir
    from attribution.workflows.claim_fast import parent_data

    _, _, withr = runs
    cfg = RunConfig.of_run(RunDir(withr).manifest().config)
    ref = loop.reference_set(parent_data(withr, cfg)[1])
    stored = [json.loads(x)["id"] for x in (withr / "val_sets" / "reference.jsonl").read_text().splitlines()]
    assert ref is not None and ref.example_ids == stored


def test_a_text_identical_to_a_corpus_document_keeps_that_document_out_of_training(runs):
    tmp_path, _, _ = runs
    doc5 = json.loads((tmp_path / "corpus.jsonl").read_text().splitlines()[5])
    texts = _texts(tmp_path, [{"id": "copy", "text": doc5["text"]}], "copy.jsonl")
    with pytest.warns(UserWarning, match="identical to a validation text"):
        run = train_and_value(
            _cfg(tmp_path, "copy", reference_texts=(texts,), steps=1, checkpoint_view=False)
        )
    assert "doc5" not in set(pd.read_parquet(run / "doc_values.parquet")["doc_id"])


def test_bad_reference_texts_fail_in_one_line(runs):
    tmp_path, _, withr = runs
    twice = _texts(tmp_path, [{"id": "x", "text": "one text"}, {"id": "x", "text": "another"}], "twice.jsonl")
    with pytest.raises(UserError, match=r"twice.jsonl:2: duplicate id 'x'"):  # file and line
        train_and_value(_cfg(tmp_path, "twice", reference_texts=(twice,)))
    one = _texts(tmp_path, [{"id": "x", "text": "one text"}], "one.jsonl")
    other = _texts(tmp_path, [{"id": "x", "text": "another text"}], "other.jsonl")
    with pytest.raises(UserError, match="'x' appears twice"):  # across files
        train_and_value(_cfg(tmp_path, "across", reference_texts=(one, other)))
    sampled = json.loads((withr / "val_sets" / "reference.jsonl").read_text().splitlines()[0])["id"]
    clash = _texts(tmp_path, [{"id": sampled, "text": "a text that is no corpus document"}], "clash.jsonl")
    with pytest.raises(UserError, match="also corpus documents in the reference set"):
        train_and_value(_cfg(tmp_path, "clash", reference_texts=(clash,)))
    with pytest.raises(UserError, match="no such reference-texts file"):
        train_and_value(_cfg(tmp_path, "missing", reference_texts=(str(tmp_path / "nope.jsonl"),)))
    for out in ("twice", "across", "clash", "missing"):  # nothing half-written
        assert not any((tmp_path / out).glob("*.parquet")), out


def test_a_resume_with_other_reference_texts_is_refused(runs):
    """The accumulators are columns of the run's texts: resuming against other texts would mix them."""
    tmp_path, _, withr = runs
    other = _texts(tmp_path, [{"id": "reg9", "text": "another register text entirely"}], "other.jsonl")
    before = (withr / "doc_values.parquet").read_bytes()
    with pytest.raises(UserError, match="valued against other validation or reference texts"):
        train_and_value(_cfg(tmp_path, "withr", resume=True, reference_texts=(other,)))
    with pytest.raises(UserError, match="valued against other validation or reference texts"):
        train_and_value(_cfg(tmp_path, "withr", resume=True))  # without them
    assert (withr / "doc_values.parquet").read_bytes() == before


def _word_grams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_the_committed_register_texts_are_in_the_corpus_format_and_borrow_from_no_case():
    """corpora/handwritten/reference*.jsonl: a reference text must be unrelated to every claim, so none may
    copy an original or a variant (no shared 12-word run, at most 2% of its 8-word runs shared: contract
    boilerplate such as "prior written consent which shall not be unreasonably withheld" is allowed), ids
    are unique across the files, and each file holds 4 texts per source of the originals."""
    folder = Path(__file__).resolve().parents[1] / "corpora" / "handwritten"

    def load(pattern: str) -> list[dict]:
        return [
            json.loads(line)
            for path in sorted(folder.glob(pattern))
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]

    cases = load("originals_*.jsonl") + load("variants_*.jsonl")
    sources = {r["meta"]["pile_set_name"] for r in load("originals_*.jsonl")}
    long_runs = set().union(*(_word_grams(r["text"], 12) for r in cases))
    runs = set().union(*(_word_grams(r["text"], 8) for r in cases))
    files = sorted(folder.glob("reference*.jsonl"))
    assert len(files) >= 2
    ids = []
    for path in files:
        texts = load(path.name)
        per_source = pd.Series([t["meta"]["pile_set_name"] for t in texts]).value_counts().to_dict()
        assert per_source == {s: 4 for s in sources}, path.name
        for t in texts:
            ids.append(t["meta"]["id"])
            assert re.fullmatch(r"hw-r-\d\d", t["meta"]["id"]) and t["meta"]["owner"], t["meta"]
            assert 230 <= len(t["text"].split()) <= 320, t["meta"]["id"]
            assert not _word_grams(t["text"], 12) & long_runs, t["meta"]["id"]
            own = _word_grams(t["text"], 8)
            assert len(own & runs) <= 0.02 * len(own), t["meta"]["id"]
    assert len(ids) == len(set(ids)) == 4 * len(sources) * len(files)
