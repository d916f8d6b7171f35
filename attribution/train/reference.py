"""The run's fixed reference set: a few dozen corpus documents held out of training, valued per example.

Why: the contrast views ask "does this document help *this* text more than it helps text in
general?". "Text in general" must be a fixed set that the run chooses itself, never the other
texts a user happens to ask about: otherwise the strongest evidence for one variant of a work is
subtracted from its other variants, and a claim's ranking changes when another claim is added.

Choice: documents are taken round-robin over the corpus's sources (so every domain is in the
reference in proportion one-per-source-per-round), each source's documents in the order of a
seeded hash of their id (so the choice is reproducible and independent of the corpus's file order).
Documents shorter than `MIN_TOKENS` are skipped (a 3-token line says nothing about text in
general). Each reference document is valued on its first sequence only: the reference needs
breadth across documents, not length, and one sequence each keeps its cost to `n` sequences.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

NAME = "reference"
MIN_TOKENS = 16


def _order_key(doc_id: str, seed: int) -> bytes:
    return hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()


def choose(
    docs: pd.DataFrame, n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()
) -> list[int]:
    """Rows of `docs` (doc_id, source, n_tokens) for an `n`-document reference set, round-robin over sources."""
    if n <= 0:
        return []
    ids = docs["doc_id"].astype(str).to_numpy()
    ok = (docs["n_tokens"].to_numpy() >= MIN_TOKENS) & ~np.isin(ids, list(exclude))
    queues: dict[str, list[int]] = {}
    for row in np.flatnonzero(ok):
        queues.setdefault(str(docs["source"].iloc[row]), []).append(int(row))
    for source in queues:
        queues[source].sort(key=lambda r: _order_key(ids[r], seed))
    chosen: list[int] = []
    rounds = 0
    while len(chosen) < n and any(len(q) > rounds for q in queues.values()):
        for source in sorted(queues):
            if len(chosen) < n and rounds < len(queues[source]):
                chosen.append(queues[source][rounds])
        rounds += 1
    return chosen
