"""Word-level text measures shared by the variant builder, the analysis layer and the reports.

Every overlap figure in the project comes from here, so "8-gram containment" means one thing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation and whitespace are separators."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Iterable[str], n: int) -> set[tuple[str, ...]]:
    toks = list(tokens)
    return {tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)}


def containment(query: str, reference: str, n: int = 8) -> float:
    """Fraction of the query's word n-grams that also occur in the reference (0 when the query has none)."""
    q = ngrams(words(query), n)
    if not q:
        return 0.0
    return len(q & ngrams(words(reference), n)) / len(q)


def jaccard(a: str, b: str, n: int = 3) -> float:
    """Jaccard similarity of the two texts' word n-gram sets (0 when both are empty)."""
    x, y = ngrams(words(a), n), ngrams(words(b), n)
    union = x | y
    return len(x & y) / len(union) if union else 0.0
