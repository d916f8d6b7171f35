"""Per-validation-example evidence: the top training documents and why they might be related.

Shapley rank and value come from the run; n-gram overlap, semantic similarity and the analysis
label come from the analysis layer's `comparison.parquet` when a compare directory is given, and
are otherwise computed with the project's shared measures (`attribution.analysis.overlap.evidence`
for containment, the longest common span and the shared character spans; `attribution.embeddings`
for MiniLM cosine similarity, batched here). Shared spans are always recomputed from the texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from attribution.analysis.overlap import evidence as overlap_evidence
from attribution.errors import BadInputError, UserError
from attribution.report.rundata import Run
from attribution.text import words
from attribution.values import ValText
from attribution.values.manifest import ATTRIBUTION_COLUMN

SPAN_N = 8  # the same n as the project's "8-gram containment"
SNIPPET_CHARS = 600


@dataclass
class EvidenceRow:
    rank: int  # Shapley rank of the document for this validation example (1 = most helpful)
    doc_id: str
    source: str
    owner: str
    score: float  # the ranking score (attribution view if the run has one, else raw value)
    value: float
    containment: float
    longest_span: int  # words
    semantic_sim: float | None
    label: str | None
    segments: list[tuple[str, bool]]  # snippet pieces; True = shared with the validation text


@dataclass
class ExampleEvidence:
    val_set: str
    val_id: str
    text: str
    meta: dict
    rows: list[EvidenceRow] = field(default_factory=list)


def snippet_segments(
    doc: str, spans: list[tuple[int, int]], limit: int = SNIPPET_CHARS
) -> list[tuple[str, bool]]:
    """A window of `doc` around its first shared span, cut into (text, is_shared) pieces."""
    start = max(0, spans[0][0] - 80) if spans else 0
    end = min(len(doc), start + limit)
    pieces: list[tuple[str, bool]] = []
    if start > 0:
        pieces.append(("… ", False))
    pos = start
    for a, b in spans:
        a, b = max(a, start), min(b, end)
        if a >= b:
            continue
        if a > pos:
            pieces.append((doc[pos:a], False))
        pieces.append((doc[a:b], True))
        pos = b
    if pos < end:
        pieces.append((doc[pos:end], False))
    if end < len(doc):
        pieces.append((" …", False))
    return pieces


def _read_comparison(compare_dir: Path) -> pd.DataFrame:
    """`comparison.parquet` indexed by (val_set, val_id, doc_id); val_set is "" when the file has none."""
    p = Path(compare_dir) / "comparison.parquet"
    if not p.exists():
        raise UserError(f"{compare_dir}: no comparison.parquet (write it with `attribution compare`)")
    try:
        comp = pd.read_parquet(p)
    except Exception as exc:
        raise BadInputError(p, None, f"cannot read Parquet file: {exc}") from exc
    for c in ("val_id", "doc_id"):
        if c not in comp:
            raise BadInputError(p, None, f"missing column {c}")
    comp["val_set"] = comp["val_set"].astype(str) if "val_set" in comp else ""
    for c in ("val_id", "doc_id"):
        comp[c] = comp[c].astype(str)
    return comp.drop_duplicates(["val_set", "val_id", "doc_id"]).set_index(["val_set", "val_id", "doc_id"])


def collect(
    run: Run,
    val_sets: Sequence[str],
    *,
    top_k: int = 5,
    max_examples: int = 20,
    compare_dir: Path | None = None,
    semantic: bool = True,
) -> tuple[list[ExampleEvidence], str]:
    """Evidence for up to `max_examples` validation examples; also returns the ranking column used
    (`attribution`: the run's default view, computed on read; `value` when the run has none)."""
    if not run.values.has_examples():
        return [], ""
    frame = run.values.view()  # the view is computed over every set (contrast), then the sets are chosen
    score_col = "value" if frame.attrs["view"] == "value" else ATTRIBUTION_COLUMN
    frame = frame[frame["val_set"].isin(list(val_sets))].reset_index(drop=True)
    if frame.empty:
        return [], score_col
    groups = frame.groupby(["val_set", "val_id"], sort=False).indices
    texts = run.val_sets()
    order: list[tuple[str, ValText]] = []
    for name in val_sets:
        present = {v for s, v in groups if s == name}
        order += [(name, it) for it in texts.get(name, []) if it.id in present]
        known = {it.id for it in texts.get(name, [])}
        order += [(name, ValText(v, "")) for v in sorted(present - known)]
    order = order[:max_examples]
    scores_all = frame[ATTRIBUTION_COLUMN].to_numpy(dtype=np.float64)
    values_all = frame["value"].to_numpy(dtype=np.float64)
    doc_all = frame["doc_id"].to_numpy()
    # Top k per example by score (descending), doc_id as the tie-break; argpartition keeps this
    # linear in the number of documents.
    tops: dict[tuple[str, str], pd.DataFrame] = {}
    for name, item in order:
        rows = groups[(name, item.id)]
        scores = scores_all[rows]
        k = min(top_k, len(scores))
        if k == 0:
            continue
        cand = rows[np.argpartition(-scores, k - 1)[:k]] if k < len(scores) else rows
        part = pd.DataFrame(
            {"doc_id": doc_all[cand], "val_id": item.id, "value": values_all[cand], "score": scores_all[cand]}
        )
        part = part.sort_values(["score", "doc_id"], ascending=[False, True], kind="mergesort")
        tops[(name, item.id)] = part.assign(rank=np.arange(1, len(part) + 1))
    top_ids = sorted({d for t in tops.values() for d in t.doc_id})
    meta = run.docs.set_index("doc_id")
    doc_text = run.texts(top_ids)
    comp = _read_comparison(compare_dir) if compare_dir else None
    by_set = comp is not None and bool((comp.index.get_level_values(0) != "").any())

    vvec: dict[tuple[str, str], np.ndarray] = {}
    dvec: dict[str, np.ndarray] = {}
    if semantic and (comp is None or "semantic_sim" not in comp.columns or comp["semantic_sim"].isna().any()):
        from attribution.embeddings import embed

        vvec = dict(zip([(n, it.id) for n, it in order], embed([it.text for _, it in order]), strict=True))
        dvec = dict(zip(top_ids, embed([doc_text[d] for d in top_ids]), strict=True))

    out = []
    for name, item in order:
        ev = ExampleEvidence(val_set=name, val_id=item.id, text=item.text, meta=item.meta)
        top = tops.get((name, item.id))
        for r in [] if top is None else top.itertuples(index=False):
            text = doc_text[r.doc_id]
            ov = overlap_evidence(item.text, text, n=SPAN_N)
            spans = ov["doc_spans"]
            key = (name if by_set else "", item.id, r.doc_id)
            c = comp.loc[key] if comp is not None and key in comp.index else None

            def has(col: str, c=c) -> bool:
                return c is not None and col in c and pd.notna(c[col])

            cont = (
                float(c["ngram_containment"])
                if has("ngram_containment")
                else float(ov["containment_val_in_doc"])
            )
            longest = int(ov["longest_common_span"])
            if has("longest_common_span"):
                lc = c["longest_common_span"]
                longest = len(words(lc)) if isinstance(lc, str) else int(lc)
            if has("semantic_sim"):
                sim: float | None = float(c["semantic_sim"])
            elif vvec:
                sim = float(vvec[(name, item.id)] @ dvec[r.doc_id])
            else:
                sim = None
            ev.rows.append(
                EvidenceRow(
                    rank=int(r.rank),
                    doc_id=r.doc_id,
                    source=str(meta.source.get(r.doc_id, "unknown")),
                    owner=str(meta.owner.get(r.doc_id, "unknown")),
                    score=float(r.score),
                    value=float(r.value),
                    containment=cont,
                    longest_span=longest,
                    semantic_sim=sim,
                    label=str(c["label"]) if has("label") else None,
                    segments=snippet_segments(text, spans),
                )
            )
        out.append(ev)
    return out, score_col
