"""Exact overlap between one validation text and one training text, with character spans to highlight.

The word n-gram containment and Jaccard come from `attribution.text`, so every "8-gram containment"
in the project is the same number. This module adds what a reviewer needs to *see* the overlap: the
longest common word span and the character ranges of shared text in each document.
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher
from typing import Any

from attribution.text import containment, jaccard

_WORD = re.compile(r"\w+", re.UNICODE)

Span = tuple[int, int]


def word_spans(text: str) -> tuple[list[str], list[Span]]:
    """Lower-cased words and their character ranges in `text` (the words `attribution.text.words` sees)."""
    toks: list[str] = []
    spans: list[Span] = []
    for m in _WORD.finditer(text):
        toks.append(m.group().lower())
        spans.append(m.span())
    return toks, spans


def longest_common_span(a: list[str], b: list[str]) -> tuple[int, int, int]:
    """Longest run of identical consecutive words: `(start in a, start in b, length)`.

    difflib's matcher without its "junk" heuristic is exact and fast enough for document-sized inputs.
    """
    if not a or not b:
        return 0, 0, 0
    match = SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b))
    return match.a, match.b, match.size


def _shared_positions(a: list[str], b: list[str], n: int) -> tuple[list[bool], list[bool]]:
    """Which words of each text lie inside an n-gram that the other text also contains."""
    grams_a = {tuple(a[i : i + n]) for i in range(len(a) - n + 1)}
    grams_b = {tuple(b[i : i + n]) for i in range(len(b) - n + 1)}
    common = grams_a & grams_b

    def mark(toks: list[str]) -> list[bool]:
        hit = [False] * len(toks)
        for i in range(len(toks) - n + 1):
            if tuple(toks[i : i + n]) in common:
                for j in range(i, i + n):
                    hit[j] = True
        return hit

    return mark(a), mark(b)


def _merge(hit: list[bool], spans: list[Span]) -> list[Span]:
    """Character ranges covering each run of consecutive marked words."""
    out: list[Span] = []
    start = None
    for i, flag in enumerate(hit):
        if flag and start is None:
            start = spans[i][0]
        if start is not None and (not flag or i == len(hit) - 1):
            end = spans[i][1] if flag else spans[i - 1][1]
            out.append((start, end))
            start = None
    return out


def evidence(val_text: str, doc_text: str, n: int = 8, semantic: bool = False) -> dict[str, Any]:
    """Everything the report shows for one (validation example, training document) pair.

    Returns n-gram containment both ways, Jaccard, the longest common word span (length and text),
    and `val_spans` / `doc_spans`: sorted, non-overlapping `(start, end)` character ranges of text
    shared through a common word n-gram, ready for highlighting. With `semantic=True` it also gives
    the MiniLM cosine similarity of the two texts.
    """
    a, a_spans = word_spans(val_text)
    b, b_spans = word_spans(doc_text)
    ia, ib, size = longest_common_span(a, b)
    hit_a, hit_b = _shared_positions(a, b, n)
    out: dict[str, Any] = {
        "ngram": n,
        "containment_val_in_doc": containment(val_text, doc_text, n),
        "containment_doc_in_val": containment(doc_text, val_text, n),
        "jaccard": jaccard(val_text, doc_text, n),
        "longest_common_span": size,
        "longest_common_text": val_text[a_spans[ia][0] : a_spans[ia + size - 1][1]] if size else "",
        "longest_val_span": (a_spans[ia][0], a_spans[ia + size - 1][1]) if size else None,
        "longest_doc_span": (b_spans[ib][0], b_spans[ib + size - 1][1]) if size else None,
        "val_spans": _merge(hit_a, a_spans),
        "doc_spans": _merge(hit_b, b_spans),
    }
    if semantic:
        from attribution.embeddings import cosine

        out["semantic_sim"] = cosine(val_text, doc_text)
    return out
