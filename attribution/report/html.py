"""The self-contained HTML report.

Everything that comes from a run (document text, source and owner names, validation text, even
the manifest) is untrusted and goes through `html.escape`; the page has no scripts, no external
resources (figures are base64 data URIs, styles are inline), and a Content-Security-Policy that
forbids scripts and remote loads as a second line of defence.
"""

from __future__ import annotations

import base64
from html import escape

from attribution.report.model import EVIDENCE_HEADERS, GroupTable, ReportModel, evidence_cells
from attribution.report.tables import COLUMNS

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

STYLE = """
body{font-family:Georgia,'Times New Roman',serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1,h2,h3{font-family:Helvetica,Arial,sans-serif}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #bbb;padding:3px 6px;vertical-align:top}
th{background:#eee}
td.num{text-align:right;font-family:monospace}
.snippet{font-family:monospace;font-size:0.85em;white-space:pre-wrap;word-break:break-word;max-width:560px}
mark{background:#ffe08a}
.note{color:#555;font-size:0.9em}
figure{margin:1em 0}
figcaption{font-size:0.9em;color:#444}
dl.summary{display:grid;grid-template-columns:max-content auto;gap:2px 1em}
dl.summary dt{font-weight:bold}
dl.summary dd{margin:0}
"""

NUMERIC = {  # right-aligned columns: the contribution tables' own, and the other tables' numbers
    *COLUMNS,
    "share_seed_sd",
    "rank",
    "score",
    "containment",
    "longest_span",
    "semantic_sim",
}


NUMERIC_EVIDENCE = {0, 4, 5, 6, 7}  # rank, score, containment, span, similarity


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _table(headers: list[str], rows: list[list[str]], numeric: set[str] | None = None) -> str:
    numeric = NUMERIC if numeric is None else numeric
    out = ["<table>", "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr>"]
    for row in rows:
        cells = []
        for h, v in zip(headers, row, strict=True):
            cls = ' class="num"' if h in numeric else ""
            cells.append(f"<td{cls}>{_e(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _group_table(t: GroupTable) -> str:
    headers = [t.by] + t.columns
    return _table(headers, [[r[h] for h in headers] for r in t.rows])


def render(m: ReportModel) -> str:
    """The whole page as one string."""
    p: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{_e(m.title)}</title>",
        f"<style>{STYLE}</style>",
        "</head><body>",
        f"<h1>{_e(m.title)}</h1>",
        "<h2>1. Summary</h2>",
        '<dl class="summary">',
    ]
    p += [f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in m.summary]
    p.append("</dl>")
    p.append(f"<h3>Royalty rule: {_e(m.rule_name)}</h3>")
    p.append(f"<p>{_e(m.rule_description)}</p>")
    p.append("<h3>How the numbers were computed</h3><ul>")
    p += [f"<li>{_e(s)}</li>" for s in m.basis]
    p.append("</ul>")

    p.append("<h2>2. Contribution and royalty tables</h2>")
    for t in m.tables:
        p.append(f'<h3 id="table-{_e(t.by)}">Per {_e(t.by)} (also in {_e(t.csv_name)})</h3>')
        p.append(_group_table(t))
    p.append("<h3>Columns</h3><dl>")
    p += [f"<dt><code>{_e(k)}</code></dt><dd>{_e(v)}</dd>" for k, v in m.column_notes]
    p.append("</dl>")

    p.append("<h2>3. Figures</h2>")
    for f in m.figures:
        data = base64.b64encode(f.png).decode("ascii")
        p.append(
            f'<figure><img alt="{_e(f.title)}" src="data:image/png;base64,{data}" style="max-width:100%">'
            f"<figcaption><b>{_e(f.title)}.</b> {_e(f.caption)}</figcaption></figure>"
        )
    p.append(f"<h3>Top documents per {_e(m.top_docs_by)}</h3>")
    p.append(
        _table(
            [m.top_docs_by, "doc_id", "value", "share", "snippet"],
            [[d.group, d.doc_id, d.value, d.share, d.snippet] for d in m.top_docs],
        )
    )

    p.append("<h2>4. Per validation example</h2>")
    p.append(f'<p class="note">{_e(m.evidence_note)}</p>')
    for ev in m.evidence:
        p.append(f"<h3>{_e(ev.val_set)} / {_e(ev.val_id)}</h3>")
        variant = ev.meta.get("variant") if isinstance(ev.meta, dict) else None
        if variant:
            p.append(f'<p class="note">variant: {_e(variant)}</p>')
        p.append(f'<div class="snippet">{_e(ev.text[:1200])}{"…" if len(ev.text) > 1200 else ""}</div>')
        headers = [m.evidence_score if h == "score" else h for h in EVIDENCE_HEADERS]
        p.append(
            "<table><tr>"
            + "".join(f"<th>{_e(h)}</th>" for h in headers)
            + "<th>training document (shared spans highlighted)</th></tr>"
        )
        for r in ev.rows:
            snippet = "".join(f"<mark>{_e(t)}</mark>" if shared else _e(t) for t, shared in r.segments)
            cells = "".join(
                f'<td class="num">{_e(v)}</td>' if i in NUMERIC_EVIDENCE else f"<td>{_e(v)}</td>"
                for i, v in enumerate(evidence_cells(r))
            )
            p.append(f'<tr>{cells}<td><div class="snippet">{snippet}</div></td></tr>')
        p.append("</table>")

    p.append("<h2>5. Limitations</h2><ul>")
    p += [f"<li>{_e(s)}</li>" for s in m.limitations]
    p.append("</ul>")
    if m.notes:
        p.append("<h2>Notes</h2><ul>")
        p += [f"<li>{_e(s)}</li>" for s in m.notes]
        p.append("</ul>")
    p.append("</body></html>")
    return "\n".join(p) + "\n"
