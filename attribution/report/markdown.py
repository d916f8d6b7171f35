"""The Markdown report: the same model and numbers as the HTML page.

Untrusted text (document snippets, names, validation text) is never written as Markdown source:
short values go into code spans and longer text into fenced code blocks, whose fences are longer
than any run of backticks in the text. A Markdown renderer therefore shows them literally and
cannot turn them into live HTML, images or links.
"""

from __future__ import annotations

import re

from attribution.report.model import EVIDENCE_HEADERS, ReportModel, evidence_cells

_TICKS = re.compile(r"`+")


def code(text: object, *, in_table: bool = True) -> str:
    """`text` as an inline code span on one line (pipes escaped for GFM tables)."""
    s = " ".join(str(text).split())
    if not s:
        return ""
    n = max((len(m) for m in _TICKS.findall(s)), default=0) + 1
    if s.startswith("`") or s.endswith("`"):
        s = f" {s} "
    if in_table:
        s = s.replace("|", "\\|")
    return "`" * n + s + "`" * n


def block(text: str, info: str = "text") -> str:
    """`text` as a fenced code block that nothing inside it can close."""
    n = max([3] + [len(m) + 1 for m in _TICKS.findall(text)])
    fence = "`" * n
    return f"{fence}{info}\n{text.rstrip()}\n{fence}"


_ACTIVE = re.compile(r"([\\`*_\[\]<>&!|~])")


def prose(text: str) -> str:
    """Our own sentences, which may quote names from the run: escape what could make markup or a link.

    Backslash-escapes the characters that start HTML, emphasis, links and images, and breaks the
    `scheme://` and `www.` patterns that GFM would turn into links.
    """
    s = _ACTIVE.sub(r"\\\1", " ".join(text.split()))
    return s.replace("://", "\\://").replace("www.", "www\\.")


def _table(headers: list[str], rows: list[list[str]], code_cols: set[str]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [code(v) if h in code_cols else v for h, v in zip(headers, row, strict=True)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def render(m: ReportModel) -> str:
    """The whole report as Markdown text, figures linked from `figures/`."""
    p: list[str] = [f"# {prose(m.title)}", "", "## 1. Summary", ""]
    p += [f"- **{prose(k)}:** {code(v, in_table=False)}" for k, v in m.summary]
    p += [
        "",
        f"### Royalty rule: {code(m.rule_name, in_table=False)}",
        "",
        prose(m.rule_description),
        "",
        "### How the numbers were computed",
        "",
    ]
    p += [f"- {prose(s)}" for s in m.basis]

    p += ["", "## 2. Contribution and royalty tables", ""]
    for t in m.tables:
        p += [f"### Per {t.by} (also in {code(t.csv_name, in_table=False)})", ""]
        headers = [t.by] + t.columns
        p += _table(headers, [[r[h] for h in headers] for r in t.rows], {t.by})
        p.append("")
    p += ["### Columns", ""]
    p += [f"- {code(k, in_table=False)}: {prose(v)}" for k, v in m.column_notes]

    p += ["", "## 3. Figures", ""]
    for f in m.figures:
        p += [f"![{prose(f.title)}](figures/{f.name}.png)", "", f"*{prose(f.title)}.* {prose(f.caption)}", ""]
    p += [f"### Top documents per {m.top_docs_by}", ""]
    p += _table(
        [m.top_docs_by, "doc_id", "value", "share", "snippet"],
        [[d.group, d.doc_id, d.value, d.share, d.snippet] for d in m.top_docs],
        {m.top_docs_by, "doc_id", "snippet"},
    )

    p += ["", "## 4. Per validation example", "", prose(m.evidence_note), ""]
    for ev in m.evidence:
        p += [f"### {code(ev.val_set, in_table=False)} / {code(ev.val_id, in_table=False)}", ""]
        variant = ev.meta.get("variant") if isinstance(ev.meta, dict) else None
        if variant:
            p += [f"variant: {code(variant, in_table=False)}", ""]
        p += ["Validation text:", "", block(ev.text[:1200] + ("…" if len(ev.text) > 1200 else "")), ""]
        headers = [m.evidence_score if h == "score" else h for h in EVIDENCE_HEADERS]
        p += _table(headers, [evidence_cells(r) for r in ev.rows], {"doc_id", "source", "owner", "label"})
        p.append("")
        for r in ev.rows:
            marked = "".join(f"⟦{t}⟧" if shared else t for t, shared in r.segments)
            note = (
                "shared spans between ⟦ and ⟧"
                if any(shared for _, shared in r.segments)
                else "no passage of 8 or more words is shared"
            )
            p += [f"Rank {r.rank}, {code(r.doc_id, in_table=False)} ({note}):", "", block(marked), ""]

    p += ["## 5. Limitations", ""]
    p += [f"- {prose(s)}" for s in m.limitations]
    if m.notes:
        p += ["", "## Notes", ""]
        p += [f"- {prose(s)}" for s in m.notes]
    return "\n".join(p).rstrip() + "\n"
