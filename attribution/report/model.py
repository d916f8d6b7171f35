"""What a report says, as plain data: the HTML and Markdown renderers both draw from one model,
so the two can only differ in layout, never in numbers (every number is pre-formatted here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from attribution.report.evidence import EvidenceRow, ExampleEvidence

EVIDENCE_HEADERS = [
    "rank",
    "doc_id",
    "source",
    "owner",
    "score",
    "8-gram containment",
    "longest shared span (words)",
    "semantic similarity",
    "label",
]


def evidence_cells(r: EvidenceRow) -> list[str]:
    """One evidence row as the strings both renderers print (so HTML and Markdown cannot disagree)."""
    sim = "" if r.semantic_sim is None else f"{r.semantic_sim:.3f}"
    return [
        str(r.rank),
        r.doc_id,
        r.source,
        r.owner,
        f"{r.score:.6g}",
        f"{r.containment:.3f}",
        str(r.longest_span),
        sim,
        r.label or "",
    ]


@dataclass
class GroupTable:
    by: str  # "source" or "owner"
    csv_name: str
    columns: list[str]
    rows: list[dict[str, str]]  # the exact strings written to the CSV


@dataclass
class TopDoc:
    group: str
    doc_id: str
    value: str
    share: str
    snippet: str


@dataclass
class Figure:
    name: str  # file stem under figures/
    title: str
    caption: str
    png: bytes


@dataclass
class ReportModel:
    title: str
    summary: list[tuple[str, str]]
    rule_name: str
    rule_description: str
    basis: list[str]  # how the numbers were computed, sentence by sentence
    column_notes: list[tuple[str, str]]
    tables: list[GroupTable]  # the lead grouping (--by) first
    figures: list[Figure]
    top_docs_by: str
    top_docs: list[TopDoc]
    evidence: list[ExampleEvidence]
    evidence_note: str
    evidence_score: str  # what the "score" column holds, e.g. "Shapley value"
    limitations: list[str]
    notes: list[str] = field(default_factory=list)
