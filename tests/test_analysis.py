"""Analysis layer end to end on real text: indexes find copies and paraphrases, `compare` labels pairs.

The corpus is real news text (gensim's Lee corpus), cut short to keep MiniLM encoding cheap; the run
directory is synthetic (random values) except for one planted strong contributor and one generically
helpful document, with a fixed reference set as `attribution run` writes one.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from attribution.analysis import Indexes, Thresholds, add_documents, build_index, compare_run, evidence
from attribution.analysis.index import iter_corpus, read_meta
from attribution.analysis.overlap import word_spans
from attribution.cli import main
from attribution.corpus import Document
from attribution.errors import UserError
from attribution.text import containment, words
from attribution.values.views import REFERENCE_SET

N_DOCS = 60
N_WORDS = 70
N_REFERENCE = 8
PLANTED, GENERIC = "lee-040", "lee-041"  # stands out for v-none / helps every text alike

# A hand-written paraphrase of Lee document 7 (shares no 4-word run with it).
PARAPHRASE_7 = (
    "Several hundred paddlers are celebrating the new year after spending five days racing canoes down "
    "the Murray. Having covered over four hundred tiring kilometres in heat and dust, a crew from Melbourne "
    "won the fiercely fought K-one Cup today. About 230 boats set off from Yarrawonga on Thursday and a "
    "little more than 200 reached the finish at Swan Hill."
)


def _lee() -> list[str]:
    import gensim

    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", "lee_background.cor")
    with open(path, encoding="latin-1") as fh:
        return [line.strip() for line in fh if line.strip()]


def _short(text: str, n: int = N_WORDS) -> str:
    return " ".join(text.split()[:n])


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """FAISS's OpenMP threads spin against each other on a busy 2-core machine (see docs/benchmarks.md)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    texts = _lee()
    return [
        Document(f"lee-{i:03d}", _short(t), "news" if i % 2 else "wire", owner=f"owner{i % 3}")
        for i, t in enumerate(texts[:N_DOCS])
    ]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus) -> str:
    """A run directory as `attribution run` writes it: docs, example values, val sets, manifest."""
    run = tmp_path_factory.mktemp("run")
    pd.DataFrame(
        {
            "doc_id": [d.doc_id for d in corpus],
            "source": [d.source for d in corpus],
            "owner": [d.owner for d in corpus],
            "license": [None] * len(corpus),
            "n_tokens": [len(d.text.split()) for d in corpus],
            "n_seqs": 1,
            "text": [d.text for d in corpus],
        }
    ).to_parquet(run / "docs.parquet", index=False)
    lee = _lee()
    d12 = corpus[12].text.split()
    val = [
        {"id": "v-exact", "text": corpus[5].text, "meta": {"variant": "exact", "target_id": "lee-005"}},
        {
            "id": "v-partial",
            "text": _short(lee[200], 30) + " " + " ".join(d12[10:50]),
            "meta": {"variant": "partial", "target_id": "lee-012"},
        },
        {"id": "v-para", "text": PARAPHRASE_7, "meta": {"variant": "paraphrase", "target_id": "lee-007"}},
        {"id": "v-none", "text": _short(lee[250], 60), "meta": {"variant": "unrelated"}},
    ]
    ref = [
        {"id": f"ref-{i}", "text": _short(lee[270 + i], 50), "meta": {"reference": True}}
        for i in range(N_REFERENCE)
    ]
    (run / "val_sets").mkdir()
    for name, items in (("demo", val), (REFERENCE_SET, ref)):
        with open(run / "val_sets" / f"{name}.jsonl", "w") as fh:
            fh.writelines(json.dumps(v) + "\n" for v in items)
    rng = np.random.default_rng(0)
    rows = []
    for name, items in (("demo", val), (REFERENCE_SET, ref)):
        for v in items:
            values = rng.normal(0, 1e-3, size=len(corpus))
            values[41] += 0.5  # generically helpful: large for every text, the reference's included
            if v["id"] == "v-none":
                values[40] = 1.0  # planted: an unrelated document with by far the largest value
            for d, x in zip(corpus, values, strict=True):
                rows.append({"doc_id": d.doc_id, "val_set": name, "val_id": v["id"], "value": x})
    pd.DataFrame(rows).to_parquet(run / "example_values.parquet", index=False)
    (run / "manifest.json").write_text(json.dumps({"default_view": "value"}))
    return str(run)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, run_dir) -> str:
    out = tmp_path_factory.mktemp("idx") / "index"
    build_index(iter_corpus([run_dir]), out, jobs=1, sources=[run_dir])
    return str(out)


@pytest.fixture(scope="module")
def ix(index_dir) -> Indexes:
    return Indexes.load(index_dir)


def test_meta_records_fingerprint_parameters_versions(index_dir, corpus):
    meta = read_meta(index_dir)
    assert meta["n_docs"] == N_DOCS and meta["generation"] == 1
    assert len(meta["corpus_fingerprint"]) == 64
    assert meta["lexical"]["params"]["ngram"] == 8 and meta["lexical"]["kind"] == "flat"
    assert meta["semantic"]["kind"] == "flat" and "MiniLM" in meta["semantic"]["model"]
    assert {"faiss", "bm25s", "numpy", "sentence_transformers"} <= set(meta["versions"])


def test_exact_and_partial_copies_found_first_lexically(ix, corpus):
    exact = ix.lexical_search(corpus[5].text, 5)
    assert exact.doc_id.iloc[0] == "lee-005" and exact.containment.iloc[0] == 1.0
    d12 = corpus[12].text.split()
    partial = "Unrelated words about the weather in the north lead in here. " + " ".join(d12[15:55])
    hits = ix.lexical_search(partial, 5)
    assert hits.doc_id.iloc[0] == "lee-012"
    assert hits.containment.iloc[0] == pytest.approx(containment(partial, corpus[12].text, 8))
    assert (hits.containment.iloc[1:] < 0.1).all() and (hits.containment > 0).all()
    assert ix.lexical_search("too short", 5).empty  # fewer words than one n-gram
    jac, con = ix.lexical.estimates(partial, [12, 3])  # from stored signatures only
    assert con[0] == pytest.approx(hits.containment.iloc[0], abs=0.15) and con[1] < 0.05


def test_paraphrase_found_first_semantically_not_lexically(ix):
    assert containment(PARAPHRASE_7, ix.text("lee-007"), 4) == 0.0
    sem = ix.semantic_search(PARAPHRASE_7, 5)
    assert sem.doc_id.iloc[0] == "lee-007"
    assert sem.cosine.iloc[0] > 0.7 > sem.cosine.iloc[1]
    assert ix.lexical_search(PARAPHRASE_7, 5).empty  # no shared 8-gram with any document


def test_bm25_search_finds_the_exact_copy(ix, corpus):
    hits = ix.bm25_search(corpus[20].text, 3)
    assert hits.doc_id.iloc[0] == "lee-020"
    assert hits.bm25.is_monotonic_decreasing


def test_evidence_spans_mark_the_shared_text(corpus):
    doc = corpus[12].text
    span_words = doc.split()[15:55]
    val = "Unrelated words about the weather lead in here. " + " ".join(span_words) + " And a tail."
    ev = evidence(val, doc)
    assert ev["longest_common_span"] == len(words(" ".join(span_words)))
    assert ev["containment_val_in_doc"] == pytest.approx(containment(val, doc, 8))
    assert len(ev["val_spans"]) == 1 and len(ev["doc_spans"]) == 1
    (vs, ve), (ds, de) = ev["val_spans"][0], ev["doc_spans"][0]
    assert words(val[vs:ve]) == words(doc[ds:de]) == words(" ".join(span_words))
    assert ev["longest_common_text"] == val[vs:ve]
    none = evidence("completely different words here and there and everywhere again", doc)
    assert none["val_spans"] == [] and none["longest_common_span"] < 3


def test_word_spans_agree_with_text_words(corpus):
    for d in corpus[:10]:
        toks, spans = word_spans(d.text)
        assert toks == words(d.text)
        assert [d.text[s:e].lower() for s, e in spans] == toks


def test_add_documents_new_generation_findable_and_duplicates_rejected(tmp_path, corpus):
    out = tmp_path / "idx"
    build_index(corpus[:10], out, semantic=None, jobs=1)
    fp1 = read_meta(out)["corpus_fingerprint"]
    meta = add_documents(out, corpus[10:14], jobs=1)
    assert meta["generation"] == 2 and meta["n_docs"] == 14 and meta["corpus_fingerprint"] != fp1
    ix = Indexes.load(out)
    assert ix.lexical_search(corpus[12].text, 3).doc_id.iloc[0] == "lee-012"
    assert ix.bm25_search(corpus[13].text, 1).doc_id.iloc[0] == "lee-013"
    with pytest.raises(UserError, match="duplicate doc_id"):
        add_documents(out, corpus[13:15], jobs=1)
    assert read_meta(out)["n_docs"] == 14  # the failed addition left the index as it was
    with pytest.raises(UserError, match="semantic"):
        ix.semantic_search("anything", 3)
    with pytest.raises(UserError, match="not empty"):
        build_index(corpus[:3], out, semantic=None, jobs=1)


def test_compare_on_synthetic_run(tmp_path, run_dir, index_dir):
    out = tmp_path / "cmp"
    table = compare_run(run_dir, index_dir, out, k=5)
    for name in ("comparison.parquet", "summary.csv", "summary.md", "compare.json"):
        assert (out / name).is_file()
    saved = pd.read_parquet(out / "comparison.parquet")
    required = [
        "val_id",
        "doc_id",
        "shapley_rank",
        "lexical_rank",
        "semantic_rank",
        "bm25_rank",
        "ngram_containment",
        "longest_common_span",
        "semantic_sim",
        "label",
    ]
    assert set(required) <= set(saved.columns) and len(saved) == len(table)

    def pair(val_id, doc_id):
        row = saved[(saved.val_id == val_id) & (saved.doc_id == doc_id)]
        assert len(row) == 1
        return row.iloc[0]

    exact = pair("v-exact", "lee-005")
    assert exact.label == "verbatim" and exact.lexical_rank == 1 and exact.ngram_containment == 1.0
    assert exact.longest_common_span == len(words(exact_text := Indexes.load(index_dir).text("lee-005")))
    assert exact_text
    assert pair("v-partial", "lee-012").label == "verbatim"
    para = pair("v-para", "lee-007")
    assert para.label == "paraphrastic" and para.semantic_rank == 1 and para.ngram_containment == 0.0
    planted = pair("v-none", PLANTED)
    assert planted.shapley_rank == 1 and planted.label == "non-obvious influence"
    assert planted.standout_z > 100
    generic = saved[saved.doc_id == GENERIC]  # top-2 for every text, but it does not stand out
    assert (generic.shapley_rank <= 2).all() and (
        generic.standout_z.abs() < Thresholds().for_basis("value").influence_z
    ).all()
    assert set(generic.label) <= {"none", "verbatim", "paraphrastic"} and len(generic) == 4
    assert REFERENCE_SET not in set(saved.val_set)  # the reference is not labelled against itself

    summary = pd.read_csv(out / "summary.csv")
    allrows = summary[(summary.variant == "all")].set_index("method")
    assert allrows.loc["lexical", "n_with_target"] == 3
    exact_rows = summary[summary.variant == "exact"].set_index("method")
    assert exact_rows.loc["lexical", "precision_at_1"] == 1.0 and exact_rows.loc["bm25", "recall_at_k"] == 1.0
    para_rows = summary[summary.variant == "paraphrase"].set_index("method")
    assert para_rows.loc["semantic", "precision_at_1"] == 1.0
    assert allrows.loc["shapley", "n_non_obvious_influence"] >= 1

    md = (out / "summary.md").read_text()
    top = saved[(saved.shapley_rank <= 5) & (saved.shapley_value > 0)]
    n_non = int((top.label == "non-obvious influence").sum())
    assert n_non >= 1 and f"{n_non} of {len(top)} top contributors" in md
    info = json.loads((out / "compare.json").read_text())
    assert info["thresholds"]["paraphrase_semantic"] == Thresholds().paraphrase_semantic
    assert info["standout"]["tested"] and info["standout"]["n_reference_examples"] == N_REFERENCE
    non_obvious = top[top.label == "non-obvious influence"]
    assert info["non_obvious_influence_by_target"] == {
        "target": int(non_obvious.is_target.sum()),
        "not_target": int((~non_obvious.is_target).sum()),
    }
    assert "Standout test" in md and f"over the {N_REFERENCE} examples" in md
    assert "sample standard deviations" in md  # the raw value's z: the document's own sd

    # thresholds are configurable and change labels
    strict = compare_run(run_dir, index_dir, None, k=5, thresholds=Thresholds(paraphrase_semantic=0.99))
    row = strict[(strict.val_id == "v-para") & (strict.doc_id == "lee-007")].iloc[0]
    assert row.label != "paraphrastic"


def test_the_checkpoint_views_label_by_the_checkpoint_cosines_z(tmp_path, run_dir, index_dir):
    """Under `standout_checkpoint`, `standout_z` is the z of `checkpoint_cosine` (not of the raw value),
    and its threshold is that basis's (`INFLUENCE_Z`): once the view's reader dropped the column, so the
    label quietly used the raw value's z at the strictest threshold."""
    from attribution.analysis.compare import INFLUENCE_Z
    from attribution.values.views import standout

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ev = pd.read_parquet(run / "example_values.parquet")
    rng = np.random.default_rng(1)
    cosine = ev.assign(checkpoint_cosine=rng.normal(0, 0.01, len(ev)))  # unrelated to `value`
    cosine.loc[(cosine.val_id == "v-para") & (cosine.doc_id == "lee-007"), "checkpoint_cosine"] = 0.2
    cosine.drop(columns="value").to_parquet(run / "checkpoint_values.parquet", index=False)
    table = compare_run(run, index_dir, tmp_path / "c", k=5, view="standout_checkpoint")
    want = cosine.assign(z=standout(cosine, "checkpoint_cosine")).set_index(["val_id", "doc_id"]).z
    got = table.set_index(["val_id", "doc_id"]).standout_z
    np.testing.assert_allclose(got.to_numpy(), want.loc[got.index].to_numpy(), rtol=1e-12)
    assert got.loc[("v-para", "lee-007")] == got.max() > 10
    info = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert info["standout"]["z_of"] == "checkpoint_cosine"
    assert info["thresholds"]["influence_z"] == INFLUENCE_Z["checkpoint_cosine"]
    # the summary says what one unit of this z is: the pooled scale, not the document's own sd
    assert "typical spreads" in (tmp_path / "c" / "summary.md").read_text()


def test_compare_without_reference_set_keeps_the_old_rule_and_warns(tmp_path, run_dir, index_dir):
    """A run made before the reference set existed: no standout test, one warning, the generic document
    counts as `non-obvious influence` again."""
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old)
    (old / "val_sets" / f"{REFERENCE_SET}.jsonl").unlink()
    ev = pd.read_parquet(old / "example_values.parquet")
    ev[ev.val_set != REFERENCE_SET].to_parquet(old / "example_values.parquet", index=False)
    with pytest.warns(UserWarning, match="cannot test whether a document stands out") as caught:
        table = compare_run(old, index_dir, tmp_path / "cmp", k=5)
    assert sum("stands out" in str(w.message) for w in caught) == 1
    assert table.standout_z.isna().all()
    generic = table[(table.val_id == "v-none") & (table.doc_id == GENERIC)].iloc[0]
    assert generic.label == "non-obvious influence"
    assert "Standout not tested" in (tmp_path / "cmp" / "summary.md").read_text()
    assert not json.loads((tmp_path / "cmp" / "compare.json").read_text())["standout"]["tested"]


def test_cli_build_compare_and_errors(tmp_path, run_dir):
    runner = CliRunner()
    idx = tmp_path / "idx"
    res = runner.invoke(
        main, ["index", "build", "--corpus", run_dir, "--out", str(idx), "--no-semantic", "--jobs", "1"]
    )
    assert res.exit_code == 0, res.output
    extra = tmp_path / "more.jsonl"
    extra.write_text(
        "".join(
            json.dumps({"id": f"more-{i}", "text": t, "meta": {"pile_set_name": "more"}}) + "\n"
            for i, t in enumerate(_lee()[200:203])
        )
    )
    res = runner.invoke(main, ["index", "add", str(idx), "--corpus", str(extra), "--jobs", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["index", "info", str(idx)])
    info = json.loads(res.output)
    assert info["generation"] == 2 and info["n_docs"] == N_DOCS + 3 and info["history"][-1]["added"] == 3
    res = runner.invoke(
        main,
        [
            "compare",
            run_dir,
            "--index",
            str(idx),
            "--out",
            str(tmp_path / "c"),
            "-k",
            "3",
            "--threshold",
            "verbatim_span=30",
        ],
    )
    assert res.exit_code == 0, res.output
    saved = pd.read_parquet(tmp_path / "c" / "comparison.parquet")
    assert saved.semantic_sim.isna().all() and saved.semantic_rank.isna().all()
    assert json.loads((tmp_path / "c" / "compare.json").read_text())["thresholds"]["verbatim_span"] == 30
    res = runner.invoke(main, ["compare", run_dir, "--index", str(tmp_path), "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "not an index directory" in res.output
    res = runner.invoke(
        main, ["compare", run_dir, "--index", str(idx), "--out", str(tmp_path / "d"), "--view", "nope"]
    )
    assert res.exit_code == 2 and "no column 'nope'" in res.output
    res = runner.invoke(
        main,
        ["compare", run_dir, "--index", str(idx), "--out", str(tmp_path / "d"), "--threshold", "bogus=1"],
    )
    assert res.exit_code == 2 and "unknown threshold" in res.output


@pytest.mark.slow
def test_compare_on_a_real_tiny_run(tmp_path):
    """`attribution run`'s code path (`train_and_value`, a 1-layer GPT-2) then `index build` + `compare`."""
    from attribution.train import RunConfig, train_and_value

    lee = _lee()
    with open(tmp_path / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for i, text in enumerate(lee[:16]):
            fh.write(
                json.dumps({"id": f"lee-{i}", "text": _short(text, 90), "meta": {"pile_set_name": "news"}})
                + "\n"
            )
    val = [
        {
            "id": "copy-3",
            "text": "As reported: " + _short(lee[3], 60),
            "meta": {"variant": "partial_copy", "target_id": "lee-3"},
        },
        {"id": "para-7", "text": PARAPHRASE_7, "meta": {"variant": "paraphrase", "target_id": "lee-7"}},
        {"id": "other", "text": _short(lee[150], 60), "meta": {"variant": "unrelated"}},
    ]
    with open(tmp_path / "val.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(v) + "\n" for v in val)
    cfg = RunConfig(
        corpus=[str(tmp_path / "corpus.jsonl")],
        val={"news": str(tmp_path / "val.jsonl")},
        out=str(tmp_path / "run"),
        preset="test-micro",
        steps=6,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    run = train_and_value(cfg)
    runner = CliRunner()
    res = runner.invoke(
        main, ["index", "build", "--corpus", str(run), "--out", str(tmp_path / "idx"), "--jobs", "1"]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        main,
        ["compare", str(run), "--index", str(tmp_path / "idx"), "--out", str(tmp_path / "cmp"), "-k", "5"],
    )
    assert res.exit_code == 0, res.output
    saved = pd.read_parquet(tmp_path / "cmp" / "comparison.parquet")
    assert set(saved.val_id) == {"copy-3", "para-7", "other"}
    assert saved.shapley_rank.notna().any() and saved.shapley_value.notna().any()
    copy = saved[(saved.val_id == "copy-3") & (saved.doc_id == "lee-3")].iloc[0]
    assert copy.label == "verbatim" and copy.lexical_rank == 1
    para = saved[(saved.val_id == "para-7") & (saved.doc_id == "lee-7")].iloc[0]
    assert para.label == "paraphrastic" and para.semantic_rank == 1
    md = (tmp_path / "cmp" / "summary.md").read_text()
    assert "top contributors" in md and "non-obvious influence" in md


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_large_corpus_lexical_kinds_find_copies(tmp_path, corpus, kind):
    from attribution.analysis.lexical import LexicalParams

    meta = build_index(
        corpus, tmp_path / kind, lexical=LexicalParams(kind=kind), semantic=None, bm25=None, jobs=1
    )
    assert meta["lexical"]["kind"] == kind and "bm25" not in meta
    ix = Indexes.load(tmp_path / kind)
    for i in (3, 31, 59):
        assert ix.lexical_search(corpus[i].text, 3).doc_id.iloc[0] == corpus[i].doc_id


@pytest.mark.parametrize("kind", ["hnsw"])
def test_large_corpus_semantic_kinds(tmp_path, kind):
    """The graph float index, on random unit vectors standing in for embeddings.

    ("ivfpq" is left out: in this faiss-cpu build, training the product quantizer on 1,000 vectors
    took minutes on the shared test machine.)"""
    from attribution.analysis.semantic import SemanticIndex, SemanticParams

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((1000, 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    owner = np.repeat(np.arange(500), 2)  # two windows per document
    params = SemanticParams(kind=kind)
    assert SemanticIndex.write(tmp_path, params, vecs, owner) == kind
    index = SemanticIndex(tmp_path, params)
    assert index.kind == kind
    found = [index.search_vectors(vecs[w][None, :], 5)[0][0] for w in range(0, 1000, 50)]
    assert found == [owner[w] for w in range(0, 1000, 50)]
    # exact similarity from the stored (float16) embeddings: best window of each document
    expected = [1.0, float(max(vecs[8] @ vecs[7], vecs[9] @ vecs[7]))]
    assert index.similarity(vecs[7][None, :], [3, 4]) == pytest.approx(expected, abs=2e-3)
