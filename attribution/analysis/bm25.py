"""BM25, the paper's retrieval baseline, through the `bm25s` library.

bm25s (default "lucene" variant) scores a document d for query terms q as
`sum_t IDF(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))` with
`IDF(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))`; the tests recompute this by hand.
IDF depends on the whole corpus, so adding documents rebuilds the index from the stored texts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

STOPWORDS = "en"


@dataclass(frozen=True)
class BM25Params:
    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"


def tokenize(texts: list[str]):
    """bm25s's own tokenizer (scikit-learn word pattern, lower case, English stopwords removed)."""
    import bm25s

    return bm25s.tokenize(texts, stopwords=STOPWORDS, show_progress=False)


def build(directory: Path, texts: list[str], params: BM25Params) -> None:
    """Index the texts and save with bm25s's own (pickle-free) format, atomically as a directory."""
    import os
    import shutil
    import tempfile

    import bm25s

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    retriever = bm25s.BM25(k1=params.k1, b=params.b, method=params.method)
    retriever.index(tokenize(texts), show_progress=len(texts) > 50_000)
    tmp = Path(tempfile.mkdtemp(prefix=".bm25.", dir=directory.parent))
    try:
        retriever.save(str(tmp), show_progress=False)
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class BM25Index:
    def __init__(self, directory: Path):
        import bm25s

        self.retriever = bm25s.BM25.load(str(directory), mmap=True, show_progress=False)
        self.n_docs = int(self.retriever.scores["num_docs"])

    def query_tokens(self, text: str) -> list[str]:
        import bm25s

        return bm25s.tokenize([text], stopwords=STOPWORDS, return_ids=False, show_progress=False)[0]

    def scores(self, text: str) -> np.ndarray:
        """BM25 score of every indexed document for the query (float32 [n_docs])."""
        return np.asarray(self.retriever.get_scores(self.query_tokens(text)))

    def search(self, text: str, k: int = 10) -> list[tuple[int, float]]:
        """Top-k `(row, score)`, positive scores only (a document sharing no term is not a match)."""
        s = self.scores(text)
        k = min(k, len(s))
        if k == 0:
            return []
        top = np.argpartition(-s, k - 1)[:k]
        top = top[np.lexsort((top, -s[top]))]
        return [(int(r), float(s[r])) for r in top if s[r] > 0]
