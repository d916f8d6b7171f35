"""claims.md and claims.html for a claim run: ranking by the default view, raw values, escaping, a real browser.

The run directory is built by hand with known per-example values chosen so that the raw value and the
default view rank the documents differently; documents, ids, owners and claims carry hostile HTML.
"""

from __future__ import annotations

import json
import re
from html import escape
from pathlib import Path

import pandas as pd
import pytest
from browser import render
from test_report_browser import PROBE

from attribution.errors import UserError
from attribution.report.claims import write_claims_report
from attribution.values import DEFAULT_VIEW, VIEWS

SCRIPT = "<script>window.__pwned=1</script>"
IMG = '<img src=x onerror="window.__pwned=1">'
CLAIM_0 = "the quick brown fox jumps over the lazy dog near the quiet river bank at dawn"

DOCS = [  # doc_id, source, owner, text, n_tokens
    ("doc-a", "books", "Acme | Publishing", "Once upon a time " + CLAIM_0 + " and then it slept.", 30),
    (f"doc-{IMG}", f"web{SCRIPT}", IMG, f"Breaking {SCRIPT} news about a fox and a dog.", 400),
    ("doc-c", "news", f"Owner {SCRIPT} | Ltd", f"A report on rivers {IMG} and the bank at dawn.", 12),
    ("doc-d", "code", "PSF", "def f(x):\n    return x | 1", 5),
    ("doc-e", "legal", "OSI", "Permission is hereby granted, free of charge, to any person.", 60),
]
CLAIMS = [
    {"id": "claim-0", "text": CLAIM_0, "meta": {}},
    {"id": f"claim-{SCRIPT}", "text": f"A second claim {IMG} about | pipes and {SCRIPT}.", "meta": {}},
]
# Raw values per (doc, claim): doc-b's large raw value comes with many tokens and helps both claims alike,
# so the default view (contrast per token) must rank it below doc-a and doc-c for claim 0.
VALUES = {
    "doc-a": (0.020, -0.001),
    f"doc-{IMG}": (0.050, 0.048),
    "doc-c": (0.004, 0.0),
    "doc-d": (-0.003, 0.002),
    "doc-e": (0.001, 0.001),
}


def make_claim_run(root: Path) -> Path:
    """A claim run directory in the layout `attribution claim` writes (docs/architecture.md)."""
    (root / "val_sets").mkdir(parents=True)
    docs = pd.DataFrame(DOCS, columns=["doc_id", "source", "owner", "text", "n_tokens"])
    docs["license"] = None
    docs["n_seqs"] = 1
    docs[["doc_id", "source", "owner", "license", "n_tokens", "n_seqs", "text"]].to_parquet(
        root / "docs.parquet"
    )
    rows = [(d, "claims", c["id"], v[j]) for d, v in VALUES.items() for j, c in enumerate(CLAIMS)]
    ev = pd.DataFrame(rows, columns=["doc_id", "val_set", "val_id", "value"])
    ev["value_normalized"] = ev["value"] * 10
    ev["value_cosine"] = ev["value"] * 3
    ev.to_parquet(root / "example_values.parquet")
    # the checkpoint cosines (`attribution.workflows.checkpoint_similarity`), in their own table
    ev[["doc_id", "val_set", "val_id"]].assign(checkpoint_cosine=ev["value"] * 2).to_parquet(
        root / "checkpoint_values.parquet"
    )
    dv = ev.groupby("doc_id", as_index=False)["value"].sum().merge(docs[["doc_id", "source", "owner"]])
    dv["val_set"] = "claims"
    dv["value_normalized"], dv["n_seen"], dv["first_step"], dv["last_step"] = dv["value"], 1, 0, 0
    dv.to_parquet(root / "doc_values.parquet")
    with open(root / "val_sets" / "claims.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(c) + "\n" for c in CLAIMS)
    # Written by hand: the run names its default view under values.default_view.
    (root / "manifest.json").write_text(
        json.dumps({"status": "complete", "values": {"default_view": DEFAULT_VIEW}})
    )
    return root


def expected(root: Path, claim_id: str) -> pd.DataFrame:
    """The claim's rows in default-view order, computed straight from the frame with the view's function."""
    keys = ["doc_id", "val_set", "val_id"]
    ev = pd.read_parquet(root / "example_values.parquet")
    ev = ev.merge(pd.read_parquet(root / "checkpoint_values.parquet"), on=keys, how="left")
    docs = pd.read_parquet(root / "docs.parquet", columns=["doc_id", "n_tokens"])
    ev["score"] = VIEWS[DEFAULT_VIEW].fn(ev, docs).to_numpy()
    one = ev[ev["val_id"] == claim_id]
    return one.sort_values(["score", "doc_id"], ascending=[False, True], kind="mergesort")


@pytest.fixture
def written(tmp_path):
    run = make_claim_run(tmp_path / "run")
    md, page = write_claims_report(run, tmp_path / "out", top_k=4, semantic=False)
    return run, md.read_text(encoding="utf-8"), page.read_text(encoding="utf-8")


def _html_doc_ids(page: str) -> list[list[str]]:
    """doc_id column of each claim table (second cell of each body row), unescaped."""
    import html

    tables = re.findall(r"<table>(.*?)</table>", page, flags=re.S)
    return [
        [
            html.unescape(r[1])
            for r in (re.findall(r"<td[^>]*>(.*?)</td>", row) for row in t.split("<tr>"))
            if r
        ]
        for t in tables
    ]


def _md_rows(md: str) -> list[list[str]]:
    """Body rows of each Markdown table, as raw cell strings."""
    out, cur = [], None
    for line in md.splitlines():
        if line.startswith("| rank |"):
            cur = []
            out.append(cur)
        elif line.startswith("|---"):
            continue
        elif line.startswith("| ") and cur is not None:
            cur.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
        else:
            cur = None
    return out


def test_ranking_follows_the_default_view_in_both_files(written):
    run, md, page = written
    exp = [expected(run, c["id"]) for c in CLAIMS]
    raw_order = (
        pd.read_parquet(run / "example_values.parquet")
        .query("val_id == 'claim-0'")
        .sort_values("value", ascending=False)["doc_id"]
        .tolist()
    )
    assert exp[0]["doc_id"].tolist()[:4] != raw_order[:4]  # the test can tell view from raw value

    tables = _html_doc_ids(page)
    assert tables == [e["doc_id"].tolist()[:4] for e in exp]
    md_tables = _md_rows(md)
    for rows, e in zip(md_tables, exp, strict=True):
        assert [r[0] for r in rows] == ["1", "2", "3", "4"]
        ids = [r[1].strip("`").replace("\\|", "|") for r in rows]
        assert ids == e["doc_id"].tolist()[:4]
        # Raw value and view value of every row, as printed.
        assert [r[4] for r in rows] == [f"{v:.6g}" for v in e["value"][:4]]
        assert [r[5] for r in rows] == [f"{v:.6g}" for v in e["score"][:4]]
    for v in exp[0]["value"][:4]:
        assert f'<td class="num">{v:.6g}</td>' in page
    # The header says which view ranks, and the sign convention is stated in both files.
    assert f"{DEFAULT_VIEW} value" in md and f"<th>{DEFAULT_VIEW} value</th>" in page
    for text in (md, page):
        assert "lowered the claim" in text and "additive" in text
    # Claims in file order.
    assert page.index("claim-0") < page.index(escape(f"claim-{SCRIPT}"))


def test_overlap_evidence(written):
    run, md, page = written
    row = next(r for r in _md_rows(md)[0] if r[1] == "`doc-a`")
    assert row[6] == "1.000"  # every 8-gram of claim 0 is in doc-a
    assert row[7] == str(len(CLAIM_0.split()))
    assert row[8] == f"`{CLAIM_0}`"
    assert row[9] == ""  # semantic=False
    assert "was not computed" in md


def test_hostile_text_is_escaped(written):
    run, md, page = written
    assert "<script" not in page.lower().replace("&lt;script", "")
    assert "onerror=" not in page.replace("onerror=&quot;", "")  # only as escaped text
    assert "<img" not in page
    for s in (SCRIPT, IMG, "Acme | Publishing"):
        assert escape(s) in page
    # Markdown: every table row has exactly the columns of its header (pipes in cells are escaped),
    # and untrusted cells are code spans.
    for rows in _md_rows(md):
        for r in rows:
            assert len(r) == 10
            assert all(c.startswith("`") for c in (r[1], r[2], r[3]))
    assert r"`Acme \| Publishing`" in md
    assert r"`Owner <script>window.__pwned=1</script> \| Ltd`" in md
    outside = re.sub(r"`+[^`]*`+", "", re.sub(r"```text\n.*?\n```", "", md, flags=re.S))
    assert "<script" not in outside and "<img" not in outside


def test_defaults_and_errors(tmp_path):
    run = make_claim_run(tmp_path / "run")
    md, page = write_claims_report(run, semantic=False)
    assert md == run / "claims.md" and page == run / "claims.html"
    assert len(_md_rows(md.read_text())[0]) == len(DOCS)  # top_k larger than the run: every document
    with pytest.raises(UserError, match="no claim set 'other'"):
        write_claims_report(run, val_set="other", semantic=False)


@pytest.mark.slow
def test_semantic_similarity(tmp_path):
    run = make_claim_run(tmp_path / "run")
    md, _ = write_claims_report(run, top_k=2, semantic=True)
    sims = [float(r[9]) for rows in _md_rows(md.read_text()) for r in rows]
    assert len(sims) == 4 and all(-1.0 <= s <= 1.0 for s in sims)
    doc_a = next(r for r in _md_rows(md.read_text())[0] if r[1] == "`doc-a`")
    assert float(doc_a[9]) > 0.8  # doc-a contains claim 0 word for word


def test_claims_html_in_chromium(tmp_path):
    run = make_claim_run(tmp_path / "run")
    _, page = write_claims_report(run, top_k=3, semantic=False)
    res = render(
        page,
        "JSON.stringify({probe: " + PROBE + ", tables: document.querySelectorAll('table').length,"
        " rows: Array.from(document.querySelectorAll('table')).map(t => t.rows.length)})",
    )
    got = json.loads(res.value)
    probe = json.loads(got["probe"])
    assert res.errors == [] and res.remote_requests == []
    assert probe["pwned"] is None
    assert probe["scripts"] == 0 and probe["handlers"] == 0 and probe["jsLinks"] == 0 and probe["frames"] == 0
    assert probe["images"] == []
    assert got["tables"] == len(CLAIMS) and got["rows"] == [4, 4]  # header + top 3
    assert SCRIPT in probe["text"] and IMG in probe["text"]
    assert res.screenshot[:8] == b"\x89PNG\r\n\x1a\n"
