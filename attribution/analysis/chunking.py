"""Windows over a document, so long documents are compared with short queries piece by piece.

A short validation example copied from a long training document has a small Jaccard similarity
with the whole document but a large one with the window that holds the copy; both the lexical and
the semantic index therefore index windows and score a document by its best window.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"\S+")


def windows(n_items: int, size: int, stride: int) -> list[tuple[int, int]]:
    """`[start, end)` windows of at most `size` items every `stride` items, covering all items.

    A document shorter than one window is one window; an empty one has none.
    """
    if size <= 0 or stride <= 0:
        raise ValueError("window size and stride must be positive")
    if n_items == 0:
        return []
    out = [(s, min(s + size, n_items)) for s in range(0, max(n_items - size, 0) + 1, stride)]
    if out[-1][1] < n_items:
        out.append((max(n_items - size, 0), n_items))
    return out


def text_windows(text: str, size: int, stride: int) -> list[str]:
    """The text cut into windows of `size` whitespace-separated tokens, original spacing kept."""
    spans = [m.span() for m in _TOKEN.finditer(text)]
    return [text[spans[s][0] : spans[e - 1][1]] for s, e in windows(len(spans), size, stride)]
