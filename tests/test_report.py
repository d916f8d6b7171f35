"""Reports: outputs agree, royalties sum to the pool, determinism, split-proof owners, escaping."""

from __future__ import annotations

import csv
import re
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from report_fixtures import make_run

from attribution.analysis.overlap import evidence as overlap_evidence
from attribution.cli import main
from attribution.errors import UserError
from attribution.report import build_report
from attribution.report import tables as T
from attribution.report.evidence import snippet_segments
from attribution.report.royalty import RULES, get_rule, split_pool
from attribution.values import RunValues


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


class _Tables(HTMLParser):
    """All <table> rows of a page as lists of cell texts (entities decoded)."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def md_rows(text: str) -> list[list[str]]:
    """Cells of every Markdown table row, code-span backticks and pipe escapes removed."""
    out = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
            out.append([re.sub(r"^`+ ?| ?`+$", "", c.strip()).replace("\\|", "|") for c in cells])
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "demo", seed=0)


@pytest.fixture(scope="module")
def built(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "demo"
    res = build_report(run, out, pool="1234.56", currency="USD", semantic=False)
    return res, out


def assert_outputs_agree(out: Path, pool: str, currency: str) -> None:
    """All files exist; CSV royalties sum to the pool; HTML and Markdown show every CSV row verbatim."""
    for name in ("report.html", "report.md", "sources.csv", "owners.csv"):
        assert (out / name).stat().st_size > 0
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figs == ["stage_shares.png", "top_documents.png", "value_distribution.png"]
    for f in figs:
        assert (out / "figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    html_rows = _Tables()
    html_rows.feed((out / "report.html").read_text(encoding="utf-8"))
    md = md_rows((out / "report.md").read_text(encoding="utf-8"))
    for by, name in (("source", "sources.csv"), ("owner", "owners.csv")):
        rows = read_csv(out / name)
        assert list(rows[0]) == [
            by,
            "n_docs",
            "n_tokens",
            "value",
            "value_per_token",
            "share",
            "royalty",
            "neg_fraction",
            "ci_low",
            "ci_high",
        ]
        # Royalties sum exactly to the pool; shares to 1 (within the 6-decimal formatting).
        assert sum(Decimal(r["royalty"]) for r in rows) == Decimal(pool)
        assert abs(sum(float(r["share"]) for r in rows) - 1) < 1e-5
        for r in rows:
            cells = list(r.values())
            assert cells in html_rows.rows, f"HTML lacks the CSV row {cells}"
            assert cells in md, f"Markdown lacks the CSV row {cells}"
            assert float(r["ci_low"]) <= float(r["ci_high"])
    # Per-example evidence: the same cells in both documents.
    md_ev = [r for r in md if len(r) == 9 and r[0].isdigit()]
    html_ev = [r[:9] for r in html_rows.rows if len(r) == 10 and r[0].isdigit()]
    assert md_ev and md_ev == html_ev
    # The rule and the pool are stated in both documents.
    for doc in ("report.html", "report.md"):
        text = (out / doc).read_text(encoding="utf-8")
        assert "positive-share" in text and f"{Decimal(pool):.2f} {currency}" in text


def test_all_outputs_exist_and_agree(built):
    _, out = built
    assert_outputs_agree(out, "1234.56", "USD")
    for doc in ("report.html", "report.md"):
        assert "all validation sets summed" in (out / doc).read_text(encoding="utf-8")


def test_numbers_match_an_independent_computation(built, run):
    _, out = built
    dv = pd.read_parquet(run / "doc_values.parquet")
    docs = pd.read_parquet(run / "docs.parquet")
    per_doc = dv.groupby("doc_id")["value"].sum().reindex(docs.doc_id, fill_value=0.0)
    clipped = per_doc.clip(lower=0)
    share = clipped / clipped.sum()
    frame = docs.set_index("doc_id").assign(value=per_doc, share=share)
    for by, name in (("source", "sources.csv"), ("owner", "owners.csv")):
        got = {r[by]: r for r in read_csv(out / name)}
        exp = frame.groupby(by).agg(
            value=("value", "sum"),
            share=("share", "sum"),
            n=("value", "size"),
            tok=("n_tokens", "sum"),
            neg=("value", lambda v: (v < 0).mean()),
        )
        assert set(got) == set(exp.index)
        for g, e in exp.iterrows():
            r = got[g]
            assert float(r["value"]) == pytest.approx(e.value, rel=1e-5)
            assert float(r["share"]) == pytest.approx(e.share, abs=1e-6)
            assert int(r["n_docs"]) == e.n and int(r["n_tokens"]) == e.tok
            assert float(r["neg_fraction"]) == pytest.approx(e.neg, abs=1e-4)
            assert float(r["value_per_token"]) == pytest.approx(e.value / e.tok, rel=1e-5)


def test_deterministic_bytes(run, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_report(run, a, pool=500, semantic=False)
    build_report(run, b, pool=500, semantic=False)
    for name in ("sources.csv", "owners.csv", "report.md", "report.html"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for f in (a / "figures").glob("*.png"):
        assert f.read_bytes() == (b / "figures" / f.name).read_bytes(), f.name


@pytest.mark.parametrize("rule", sorted(RULES))
def test_splitting_an_owner_into_shells_cannot_raise_its_payment(tmp_path, rule):
    victim = "Open Source Initiative"
    base = make_run(tmp_path / "base", seed=3)
    docs = pd.read_parquet(base / "docs.parquet")
    mine = docs.doc_id[docs.owner == victim].tolist()
    shells = {d: f"Shell {i % 4}" for i, d in enumerate(mine)}
    split = make_run(tmp_path / "split", seed=3, owner_override=shells)

    r0 = build_report(base, tmp_path / "r0", rule=rule, pool=1000, semantic=False, n_boot=20)
    r1 = build_report(split, tmp_path / "r1", rule=rule, pool=1000, semantic=False, n_boot=20)
    t0, t1 = r0.tables["owner"].set_index("owner"), r1.tables["owner"].set_index("owner")
    shell_rows = t1.loc[[f"Shell {i}" for i in range(4)]]
    assert shell_rows.share.sum() == pytest.approx(t0.loc[victim, "share"], abs=1e-12)
    # Cents: each row is rounded once, so the shells can differ by at most a cent per extra row.
    assert abs(sum(shell_rows.royalty) - t0.loc[victim, "royalty"]) <= Decimal("0.03")
    others = [o for o in t0.index if o != victim]
    assert np.allclose(t1.loc[others, "share"], t0.loc[others, "share"], atol=1e-12)

    # The scenario is a real attack: clipping per owner (instead of per document) would pay the shells more.
    net = pd.read_parquet(split / "doc_values.parquet").groupby("owner")["value"].sum()
    names = [f"Shell {i}" for i in range(4)]
    rest = net.drop(names).clip(lower=0).sum()
    together = max(net[names].sum(), 0.0)
    apart = net[names].clip(lower=0).sum()
    assert together / (rest + together) < apart / (rest + apart)


def test_rules():
    v = np.array([3.0, -1.0, 1.0, 0.0])
    assert np.allclose(get_rule("positive-share").shares(v), [0.75, 0, 0.25, 0])
    assert np.allclose(get_rule("shapley-signed").shares(v), [1.0, -1 / 3, 1 / 3, 0])
    big = np.r_[np.ones(200), 1000.0]
    s = get_rule("proportional-clipped").shares(big)
    assert s[-1] < 0.01  # the outlier is capped at the 99th percentile of positive values
    # Row-wise application (the bootstrap) equals applying the rule to each row.
    m = np.random.default_rng(0).normal(size=(5, 50))
    for rule in RULES.values():
        assert np.allclose(rule.shares(m), np.vstack([rule.shares(r) for r in m]), equal_nan=True)
    with pytest.raises(UserError, match="unknown royalty rule"):
        get_rule("bogus")


def test_split_pool_sums_exactly():
    got = split_pool(np.array([1, 1, 1]) / 3, Decimal("100"))
    assert got == [Decimal("33.34"), Decimal("33.33"), Decimal("33.33")]
    rng = np.random.default_rng(1)
    for _ in range(20):
        s = rng.dirichlet(np.ones(17))
        assert sum(split_pool(s, Decimal("999.99"))) == Decimal("999.99")


def test_bootstrap_over_steps_matches_a_plain_loop(run):
    from attribution.report.rundata import load_run

    r = load_run(run)
    sets = ["news", "code"]
    dv = T.doc_values([r], sets)
    steps = pd.read_parquet(run / "step_values.parquet")
    codes, names = T.group_codes(dv.docs, "source")
    rule = get_rule("positive-share")
    fast = T.bootstrap_steps(steps, dv, rule, [codes], n_boot=7, seed=5, chunk=3)[0]

    uniq = np.unique(steps.step)
    counts = np.random.default_rng(5).multinomial(len(uniq), np.full(len(uniq), 1 / len(uniq)), size=7)
    for b in range(7):
        w = dict(zip(uniq, counts[b], strict=True))
        vals = (
            (steps.value * steps.step.map(w))
            .groupby(steps.doc_id)
            .sum()
            .reindex(dv.docs.doc_id, fill_value=0)
        )
        sh = pd.Series(rule.shares(vals.to_numpy()), index=dv.docs.source.to_numpy()).groupby(level=0).sum()
        assert np.allclose(fast[b], sh.reindex(names).to_numpy())


def test_several_runs_report_seed_spread(tmp_path):
    runs = [make_run(tmp_path / f"s{k}", seed=k) for k in range(3)]
    res = CliRunner().invoke(
        main,
        [
            "report",
            str(runs[0]),
            "--runs",
            str(runs[1]),
            str(runs[2]),
            "--out",
            str(tmp_path / "rep"),
            "--no-semantic",
            "--bootstrap",
            "50",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = read_csv(tmp_path / "rep" / "sources.csv")
    assert "share_seed_sd" in rows[0]
    assert all(float(r["share_seed_sd"]) > 0 for r in rows)
    vals = [
        pd.read_parquet(p / "doc_values.parquet")
        .merge(pd.read_parquet(p / "docs.parquet")[["doc_id"]])
        .groupby("source")["value"]
        .sum()
        for p in runs
    ]
    mean = sum(vals) / 3
    for r in rows:
        assert float(r["value"]) == pytest.approx(mean[r["source"]], rel=1e-5)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "bootstrap replicates over the 3 runs" in md


def test_markdown_cannot_render_live_html_or_links(built):
    from markdown_it import MarkdownIt

    _, out = built
    text = (out / "report.md").read_text(encoding="utf-8")
    rendered = MarkdownIt("commonmark", {"html": True}).enable("table").render(text)
    low = rendered.lower()
    for bad in (
        "<script",
        "<img src=x",
        '<img src="http',
        "<iframe",
        "<link",
        'href="javascript',
        'href="http',
    ):
        assert bad not in low, bad
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in rendered  # shown, as text
    # Images in the rendered Markdown are only our figures.
    assert re.findall(r'<img src="([^"]+)"', rendered) == [
        "figures/stage_shares.png",
        "figures/value_distribution.png",
        "figures/top_documents.png",
    ]


def test_html_source_has_no_live_markup_from_documents(built):
    _, out = built
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert "<img src=x" not in page and "<iframe" not in page and 'href="javascript' not in page
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page
    assert 'http-equiv="Content-Security-Policy"' in page
    assert re.findall(r"<img [^>]*src=\"(?!data:image/png;base64,)", page) == []


def test_csv_neutralizes_formulas(tmp_path):
    docs_owner = {f"news-{i:04d}": '=HYPERLINK("http://evil.example","x")' for i in range(0, 48, 4)}
    run = make_run(tmp_path / "run", owner_override=docs_owner)
    build_report(run, tmp_path / "rep", semantic=False, n_boot=20)
    rows = read_csv(tmp_path / "rep" / "owners.csv")
    names = [r["owner"] for r in rows]
    assert '\'=HYPERLINK("http://evil.example","x")' in names
    assert not any(n.startswith("=") for n in names)


def test_val_set_choice_and_user_errors(run, tmp_path):
    res = build_report(run, tmp_path / "news", val_set="news", semantic=False, n_boot=20)
    assert res.val_sets == ["news"]
    dv = pd.read_parquet(run / "doc_values.parquet")
    assert res.tables["source"].value.sum() == pytest.approx(dv[dv.val_set == "news"].value.sum())
    assert "the validation set(s) news" in (tmp_path / "news" / "report.md").read_text()
    r = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "x"), "--val-set", "nope"])
    assert r.exit_code == 2 and "unknown validation set(s) nope" in r.output
    r = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "x"), "--pool", "-5"])
    assert r.exit_code == 2 and "positive amount" in r.output
    r = CliRunner().invoke(main, ["report", str(tmp_path), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "missing manifest.json" in r.output


def test_copied_passage_is_the_highlighted_segment():
    doc = (
        "Intro words here. "
        + "x" * 700
        + " The quick brown fox jumps over the lazy dog again and again. Tail."
    )
    query = "Prompt: the quick brown fox jumps over the lazy dog again and again!"
    segs = snippet_segments(doc, overlap_evidence(query, doc)["doc_spans"])
    assert [t for t, shared in segs if shared] == [
        "The quick brown fox jumps over the lazy dog again and again"
    ]
    assert segs[0] == ("… ", False)  # the window starts near the shared passage, not at the top
    assert snippet_segments("no overlap at all", []) == [("no overlap at all", False)]


def test_partial_copy_target_is_highlighted(built, run):
    _, out = built
    page = (out / "report.html").read_text(encoding="utf-8")
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "<mark>" in page and "⟦" in md


def test_compare_dir_evidence_is_shown(run, tmp_path):
    """Numbers and labels from the analysis layer's comparison.parquet replace the report's own."""
    ex = RunValues.read(run).view()  # the run's default view, as the report computes it on read
    top = (
        ex.sort_values(["val_id", "attribution", "doc_id"], ascending=[True, False, True])
        .groupby("val_id")
        .head(5)
    )
    comp = top.assign(
        shapley_rank=1,
        lexical_rank=2,
        semantic_rank=3,
        bm25_rank=4,
        ngram_containment=0.625,
        longest_common_span=17,
        semantic_sim=0.5,
        label="near-verbatim copy",
    )
    comp = comp[
        [
            "val_set",
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
    ]
    (tmp_path / "cmp").mkdir()
    comp.to_parquet(tmp_path / "cmp" / "comparison.parquet", index=False)
    build_report(run, tmp_path / "rep", compare_dir=tmp_path / "cmp", n_boot=20)
    md = (tmp_path / "rep" / "report.md").read_text(encoding="utf-8")
    rows = [r for r in md_rows(md) if len(r) == 9 and r[0].isdigit()]
    assert len(rows) == len(comp)
    assert {tuple(r[5:]) for r in rows} == {("0.625", "17", "0.500", "near-verbatim copy")}
    assert "near-verbatim copy" in (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    with pytest.raises(UserError, match="no comparison.parquet"):
        build_report(run, tmp_path / "rep2", compare_dir=tmp_path, n_boot=20)


def test_the_stated_command_reproduces_the_report(run, tmp_path):
    import shlex

    out = tmp_path / "rep"
    build_report(
        run, out, pool="250", currency="GBP", val_set="news", semantic=False, n_boot=30, max_examples=3
    )
    before = {n: (out / n).read_bytes() for n in ("sources.csv", "owners.csv", "report.md", "report.html")}
    line = next(x for x in before["report.md"].decode().splitlines() if x.startswith("- **Reproduce with"))
    argv = shlex.split(line.split("`", 1)[1].rsplit("`", 1)[0])
    assert argv[:2] == ["attribution", "report"]
    argv[argv.index("OUT")] = str(out)
    for n in before:
        (out / n).unlink()
    res = CliRunner().invoke(main, argv[1:])
    assert res.exit_code == 0, res.output
    for n, data in before.items():
        assert (out / n).read_bytes() == data, n
