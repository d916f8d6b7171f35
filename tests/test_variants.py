"""The offline paraphraser and the variant builder, on real text with the real thesaurus and MiniLM."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from click.testing import CliRunner

from attribution.corpus.document import Document
from attribution.text import containment, words
from attribution.variants.build import build_variants, parse_kinds, partial_copy, pick_targets, split_pool
from attribution.variants.paraphrase import Paraphraser, fix_articles
from attribution.variants.rewriters import Rewrite, RewriteError
from attribution.variants.thesaurus import DEFAULT_PATH, Thesaurus, parse_mythes

pytestmark = pytest.mark.skipif(not DEFAULT_PATH.is_file(), reason="Debian mythes-en-us is not installed")

FIRE = (
    "Hundreds of people have been forced to leave their homes in the Southern Highlands as strong winds "
    "pushed a huge bushfire towards the town of Hill Top. When the wind changed direction in the afternoon, "
    "firefighters were unable to protect several houses on the edge of the town. Authorities said about 500 "
    "residents had moved to nearby Mittagong, where an evacuation centre was opened at the local school. "
    "However, the weather is expected to ease tomorrow, and crews hope to contain the blaze before it reaches "
    "the main road. The fire service warned that conditions remain dangerous because the forest is very dry."
)
CRICKET = (
    "Australia won the third cricket test against South Africa by nine wickets on Sunday. The home side "
    "needed only a short time to reach the target after their bowlers dismissed the visitors cheaply. The "
    "captain praised the young fast bowler, who took six wickets in the second innings and was named player "
    "of the match. South Africa will play a series of one-day games before they return home next month."
)
FLOOD = (
    "Heavy rain caused flooding in several northern towns, and emergency crews evacuated families from "
    "low-lying streets. The river rose above its banks overnight and closed the main highway. Residents were "
    "told to move to higher ground while the storm continued, and the weather bureau warned of more rain."
)
CODE = "def main(argv):\n    for x in range(10):\n        print(x, argv[x])\n    return 0\n" * 6


@pytest.fixture(scope="module")
def para() -> Paraphraser:
    return Paraphraser()


def test_mythes_parser_keeps_plain_single_word_synonyms(tmp_path):
    dat = tmp_path / "th.dat"
    dat.write_text(
        "UTF-8\ncar|2\n(noun)|auto|automobile|motor vehicle|motorcar|wheeled vehicle (generic term)\n"
        "(noun)|railcar|railway car\nrun|2\n(noun)|tally (generic term)|runs\n(verb)|go|operate\n"
    )
    entries = parse_mythes(dat)
    th = Thesaurus(entries)
    assert th.senses("car")[0].synonyms == ("auto", "automobile", "motorcar")  # no phrases, no broader terms
    assert th.dominant_pos("car") == "noun" and th.senses("run", "verb")[0].synonyms == ("go", "operate")
    real = Thesaurus.load()
    assert "automobile" in real.senses("car")[0].synonyms


def test_paraphrase_rewords_but_keeps_names_numbers_and_meaning(para):
    out = para.paraphrase(FIRE, seed=0)
    assert out == para.paraphrase(FIRE, seed=0)  # deterministic
    assert out != FIRE
    for kept in ("Southern Highlands", "Hill Top", "500", "Mittagong"):
        assert kept in out
    assert containment(out, FIRE) <= 0.35
    from attribution.embeddings import cosine

    assert cosine(out, FIRE) >= 0.8
    # the leading subordinate clause moved behind its main clause
    assert "When the wind changed direction" not in out


def test_significant_condenses_and_leaves_few_8grams(para):
    out = para.significant(FIRE, seed=0)
    assert len(words(out)) < 0.75 * len(words(FIRE))
    assert containment(out, FIRE) <= 0.1
    from attribution.embeddings import cosine

    assert cosine(out, FIRE) >= 0.5


def test_code_is_left_alone(para):
    out = para.paraphrase(CODE, seed=1)
    for token in ("def main(argv)", "range(10)", "print(x, argv[x])"):
        assert token in out


def test_small_syntax_helpers(para):
    assert fix_articles("a apple and an banana, A orange") == "an apple and a banana, An orange"
    assert para.reorder_clauses("When it rains, the streets flood.") == "The streets flood when it rains."
    assert para.reorder_clauses("We stayed home because the roads were closed.") == (
        "Because the roads were closed, we stayed home."
    )


def _docs() -> list[Document]:
    texts = {"news/fire": FIRE, "news/cricket": CRICKET, "news/flood": FLOOD, "code/main": CODE}
    return [Document(k, v, k.split("/")[0]) for k, v in texts.items()]


def test_partial_copy_holds_a_contiguous_half_in_new_framing():
    rng = random.Random(0)
    for _ in range(5):
        text, meta = partial_copy(Document("d", FIRE, "news"), rng)
        assert meta["excerpt_share"] >= 0.5
        assert text not in FIRE and not text.startswith(FIRE[:40])
        assert containment(FIRE, text) >= 0.4  # most of the original's 8-grams are inside the variant


def test_build_all_kinds_with_distances(para):
    docs = _docs()
    fire = docs[0]
    pool = [d for d in docs if d.doc_id in ("news/flood", "news/cricket")]
    records = build_variants(
        [fire], parse_kinds("exact,partial,paraphrase,significant,similar"), pool=pool, seed=0
    )
    by_kind = {r["meta"]["variant"]: r for r in records}
    assert list(by_kind) == ["exact", "partial", "paraphrase", "significant", "similar"]
    for r in records:
        assert r["text"].strip() and r["id"] == f"{r['meta']['variant']}:news/fire"
        assert r["meta"]["target_id"] == "news/fire"
        assert {"containment_8", "jaccard_3", "cosine_minilm"} <= set(r["meta"])
    assert (
        by_kind["exact"]["meta"]["containment_8"] == 1.0 and by_kind["exact"]["meta"]["cosine_minilm"] > 0.999
    )
    assert by_kind["similar"]["meta"]["similar_doc_id"] == "news/flood"  # the bushfire's nearest topic
    assert by_kind["similar"]["meta"]["containment_8"] == 0.0
    c = [by_kind[k]["meta"]["containment_8"] for k in ("partial", "paraphrase", "significant", "similar")]
    assert c == sorted(c, reverse=True)  # each kind is farther from the original than the one before
    assert by_kind["paraphrase"]["meta"]["rewriter"] == "offline"


def test_empty_rewrite_never_becomes_a_validation_document():
    class Blank:
        name = "blank"

        def rewrite(self, text, kind, seed):
            return Rewrite("  ", self.name)

    with pytest.raises(RewriteError, match="came out empty"):
        build_variants([_docs()[0]], ["paraphrase"], rewriter=Blank())


def test_picking_prefers_prose_and_pool_excludes_targets():
    docs = _docs()
    picked = pick_targets(docs, 2, seed=0, min_words=40)
    assert "code/main" not in {d.doc_id for d in picked}
    pool = split_pool(docs, picked, 0.5, seed=0)
    assert not {d.doc_id for d in pool} & {d.doc_id for d in picked}
    with pytest.raises(Exception, match="cannot pick 5"):
        pick_targets(docs, 5, seed=0, min_words=40)


def test_cli_writes_records_heldout_pool_and_summary(tmp_path):
    from attribution.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"id": d.doc_id, "text": d.text, "meta": {"pile_set_name": d.source}}) + "\n"
            for d in _docs()
        )
    )
    out = tmp_path / "val.jsonl"
    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            "variants",
            "--corpus",
            str(corpus),
            "--ids",
            "news/fire",
            "--kinds",
            "partial,paraphrase,similar",
            "--pool-fraction",
            "0.5",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["meta"]["variant"] for x in lines] == ["partial", "paraphrase", "similar"]
    held = (tmp_path / "val.jsonl.heldout.txt").read_text().split()
    assert lines[2]["meta"]["similar_doc_id"] in held and "news/fire" not in held
    assert "8-gram containment" in res.output and "paraphrase" in res.output
    from attribution.corpus import read_validation

    assert [d.doc_id for d in read_validation(out)] == [x["id"] for x in lines]
    bad = runner.invoke(
        main,
        ["variants", "--corpus", str(corpus), "--ids", "news/fire", "--kinds", "nope", "--out", str(out)],
    )
    assert bad.exit_code == 2 and "unknown variant kind" in bad.output


@pytest.mark.slow
def test_offline_paraphraser_meets_distance_targets_on_50_builtin_documents(capsys):
    """Acceptance: paraphrase median containment <= 0.2 with median cosine >= 0.8; significant <= 0.05
    with >= 0.6, over 50 prose documents of the built-in corpus. Prints the distributions."""
    from attribution.corpus import read_corpus, resolve_corpus
    from attribution.variants.build import distance_summary

    docs = list(read_corpus(resolve_corpus("builtin")))
    targets = pick_targets(docs, 50, seed=0)
    records = build_variants(targets, ["paraphrase", "significant"], seed=0)
    rows = {r["variant"]: r for r in distance_summary(records)}
    with capsys.disabled():
        for r in rows.values():
            print("\n", json.dumps(r))
    assert (
        rows["paraphrase"]["containment_8_median"] <= 0.2
        and rows["paraphrase"]["cosine_minilm_median"] >= 0.8
    )
    assert rows["significant"]["containment_8_median"] <= 0.05
    assert rows["significant"]["cosine_minilm_median"] >= 0.6
    assert np.isfinite([r["meta"]["cosine_minilm"] for r in records]).all()
