"""`claims.md` and `claims.html`: for each claim text of a claim run, the training documents it may derive from.

Why a separate page: `attribution claim` values every training document against each claim text on its
own, and a reviewer asks one question per claim ("which documents is this text derived from, and what
do they share with it?"), not the royalty question of `report.html`. Documents are ranked by the run's
default attribution view (read through `attribution.values`, computed at read time); the raw additive
value is shown next to it. Overlap evidence uses the project's shared measures
(`attribution.analysis.overlap.evidence`, MiniLM cosine from `attribution.embeddings`), and both pages
are drawn from one list of pre-formatted rows, so they cannot disagree. Every claim text, document id,
source and owner is untrusted: the HTML escapes it and has no scripts (the report's CSP and styles),
the Markdown keeps it in code spans and fenced blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from attribution.analysis.overlap import evidence as overlap_evidence
from attribution.errors import UserError
from attribution.io import atomic_write
from attribution.report import html, markdown
from attribution.report.evidence import SPAN_N
from attribution.report.rundata import load_run
from attribution.values import VIEWS, RunValues, ValText, read_val_set

CLAIM_CHARS = 1200  # claim text shown per claim, as in the report's per-example section
SPAN_CHARS = 200  # longest shared span shown per document
HEADERS = [
    "rank",
    "doc_id",
    "source",
    "owner",
    "raw value",
    "view value",
    f"{SPAN_N}-gram containment",
    "longest shared span (words)",
    "shared span",
    "MiniLM cosine",
]
NUMERIC = {
    "rank",
    "raw value",
    "view value",
    f"{SPAN_N}-gram containment",
    "longest shared span (words)",
    "MiniLM cosine",
}
CODE_COLUMNS = {"doc_id", "source", "owner", "shared span"}  # untrusted cells, as code spans in Markdown


@dataclass
class ClaimRow:
    """One ranked document for one claim, every cell already a string (both renderers print these)."""

    cells: list[str]


@dataclass
class Claim:
    id: str
    text: str
    rows: list[ClaimRow] = field(default_factory=list)


@dataclass
class ClaimsModel:
    run_name: str
    val_set: str
    view: str
    view_meaning: str
    top_k: int
    n_docs: int
    semantic: bool
    claims: list[Claim]

    @property
    def headers(self) -> list[str]:
        return [f"{self.view} value" if h == "view value" else h for h in HEADERS]


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


def _top(view: pd.DataFrame, top_k: int) -> dict[str, pd.DataFrame]:
    """Top `top_k` documents per claim: highest view value first, doc_id breaking ties (NaN last)."""
    ordered = view.sort_values(
        ["val_id", "attribution", "doc_id"],
        ascending=[True, False, True],
        kind="mergesort",
        na_position="last",
    )
    return {
        str(k): g for k, g in ordered.groupby("val_id", sort=False).head(top_k).groupby("val_id", sort=False)
    }


def collect(
    run_dir: str | Path, *, val_set: str = "claims", top_k: int = 10, semantic: bool = True
) -> ClaimsModel:
    """What the claim pages say: per claim (file order), its top documents under the default view."""
    run = load_run(run_dir)
    values = RunValues.read(run.path, docs=run.docs, doc_values=run.doc_values)
    paths = values.run.val_set_paths()
    if val_set not in paths:
        known = ", ".join(paths) or "none"
        raise UserError(f"{run.path}: no claim set {val_set!r} under val_sets/ (this run has: {known})")
    items = read_val_set(paths[val_set])
    known_ids = {it.id for it in items}
    view = values.view()
    view_name = str(view.attrs.get("view", values.default_view))
    tops = _top(view[view["val_set"] == val_set], top_k)
    items += [ValText(v, "") for v in sorted(set(tops) - known_ids)]  # valued, but missing from the file

    top_ids = sorted({d for t in tops.values() for d in t["doc_id"]})
    doc_text = run.texts(top_ids)
    claim_vec: dict[str, np.ndarray] = {}
    doc_vec: dict[str, np.ndarray] = {}
    if semantic and top_ids:
        from attribution.embeddings import embed

        shown = [it for it in items if it.id in tops]
        claim_vec = dict(zip([it.id for it in shown], embed([it.text for it in shown]), strict=True))
        doc_vec = dict(zip(top_ids, embed([doc_text[d] for d in top_ids]), strict=True))

    meta = run.docs.set_index("doc_id")
    claims = []
    for it in items:
        top = tops.get(it.id)
        claim = Claim(id=it.id, text=it.text or "(no text for this id in the claim file)")
        for rank, r in enumerate([] if top is None else top.itertuples(index=False), 1):
            ov = overlap_evidence(it.text, doc_text[r.doc_id], n=SPAN_N)
            sim = f"{float(claim_vec[it.id] @ doc_vec[r.doc_id]):.3f}" if claim_vec else ""
            claim.rows.append(
                ClaimRow(
                    [
                        str(rank),
                        r.doc_id,
                        str(meta.source.get(r.doc_id, "unknown")),
                        str(meta.owner.get(r.doc_id, "unknown")),
                        f"{r.value:.6g}",
                        f"{r.attribution:.6g}",
                        f"{ov['containment_val_in_doc']:.3f}",
                        str(ov["longest_common_span"]),
                        _clip(ov["longest_common_text"], SPAN_CHARS),
                        sim,
                    ]
                )
            )
        claims.append(claim)
    return ClaimsModel(
        run_name=run.name,
        val_set=val_set,
        view=view_name,
        view_meaning=VIEWS[view_name].meaning,
        top_k=top_k,
        n_docs=len(run.docs),
        semantic=semantic and bool(top_ids),
        claims=claims,
    )


def _notes(m: ClaimsModel) -> list[str]:
    """The page's explanation, sentence by sentence (identical in both formats)."""
    return [
        f"Documents are ranked by the attribution view '{m.view}' ({m.view_meaning}); rank 1 is the document "
        f"most credited with lowering the claim's loss. The view is for ranking only.",
        "Sign convention: a positive value means the training document lowered the claim's loss (it helped "
        "the model produce the claim); a negative value means it raised it.",
        "The raw value is the In-Run Data Shapley value: additive over documents, steps and claims, the number "
        "that sums into totals. The view value re-scores the same run to answer 'which documents is this text "
        "derived from' and does not add up.",
        f"Overlap evidence is computed from the texts: {SPAN_N}-gram containment is the fraction of the claim's "
        f"word {SPAN_N}-grams found in the document; the longest shared span is the longest run of identical "
        "consecutive words (lower-cased), shown truncated; "
        + (
            "MiniLM cosine is the cosine similarity of all-MiniLM-L6-v2 embeddings of the claim and the "
            "document (the model reads the first 256 word pieces of each)."
            if m.semantic
            else "MiniLM cosine was not computed for these pages."
        ),
        "Overlap alone does not prove derivation, and a high value without overlap may reflect shared style "
        "or topic; read both together.",
    ]


def _summary(m: ClaimsModel) -> list[tuple[str, str]]:
    return [
        ("Run", m.run_name),
        ("Claim set", m.val_set),
        ("Claims", str(len(m.claims))),
        ("Training documents", str(m.n_docs)),
        ("Ranking view", m.view),
        ("Documents per claim", str(m.top_k)),
    ]


def _empty(c: Claim) -> str:
    return "No per-document values were recorded for this claim."


TITLE = "Claim attribution: the training documents each claim may derive from"


def render_markdown(m: ClaimsModel) -> str:
    """claims.md: untrusted text only in code spans and fenced blocks (`attribution.report.markdown`)."""
    p = [f"# {TITLE}", ""]
    p += [f"- **{k}:** {markdown.code(v, in_table=False)}" for k, v in _summary(m)]
    p += [""] + [f"- {markdown.prose(s)}" for s in _notes(m)] + [""]
    for i, c in enumerate(m.claims, 1):
        p += [
            f"## Claim {i}: {markdown.code(c.id, in_table=False)}",
            "",
            markdown.block(_clip(c.text, CLAIM_CHARS)),
            "",
        ]
        if not c.rows:
            p += [_empty(c), ""]
            continue
        p += [f"Top {len(c.rows)} documents by the {markdown.code(m.view, in_table=False)} view:", ""]
        p += markdown._table(m.headers, [r.cells for r in c.rows], CODE_COLUMNS)
        p.append("")
    return "\n".join(p).rstrip() + "\n"


def render_html(m: ClaimsModel) -> str:
    """claims.html: self-contained, escaped, no scripts (the report's CSP and styles, `attribution.report.html`)."""
    e = html._e
    p = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{e(html.CSP)}">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{e(TITLE)}</title>",
        f"<style>{html.STYLE}</style>",
        "</head><body>",
        f"<h1>{e(TITLE)}</h1>",
        '<dl class="summary">',
    ]
    p += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in _summary(m)]
    p += ["</dl>", "<ul>"] + [f"<li>{e(s)}</li>" for s in _notes(m)] + ["</ul>"]
    numeric = {f"{m.view} value" if h == "view value" else h for h in NUMERIC}
    for i, c in enumerate(m.claims, 1):
        p.append(f'<h2 class="claim">Claim {i}: <code>{e(c.id)}</code></h2>')
        p.append(f'<div class="snippet">{e(_clip(c.text, CLAIM_CHARS))}</div>')
        if not c.rows:
            p.append(f'<p class="note">{e(_empty(c))}</p>')
            continue
        p.append(f'<p class="note">Top {len(c.rows)} documents by the {e(m.view)} view.</p>')
        p.append(html._table(m.headers, [r.cells for r in c.rows], numeric))
    p.append("</body></html>")
    return "\n".join(p) + "\n"


def write_claims_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    val_set: str = "claims",
    top_k: int = 10,
    semantic: bool = True,
) -> tuple[Path, Path]:
    """Write `claims.md` and `claims.html` for a claim run (into `run_dir` unless `out_dir` is given)."""
    if top_k < 1:
        raise UserError("top_k must be at least 1")
    m = collect(run_dir, val_set=val_set, top_k=top_k, semantic=semantic)
    out = Path(run_dir if out_dir is None else out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out / "claims.md", out / "claims.html"
    with atomic_write(md_path) as fh:
        fh.write(render_markdown(m))
    with atomic_write(html_path) as fh:
        fh.write(render_html(m))
    return md_path, html_path


__all__ = ["ClaimsModel", "collect", "render_html", "render_markdown", "write_claims_report"]
