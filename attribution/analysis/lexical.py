"""Lexical index: MinHash signatures of word n-gram windows in a FAISS binary index.

Each document is cut into word windows (see `chunking`), each window gets a `k`-value MinHash
signature (kept on disk, memory-mapped, for Jaccard/containment estimates) and a k-bit 1-bit MinHash
code (in FAISS, searched by Hamming distance). A query's candidate documents are then re-ranked by
their *exact* n-gram containment of the query, computed from the stored texts.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from attribution.analysis.chunking import windows
from attribution.analysis.minhash import (
    MinHasher,
    estimate_containment,
    estimate_jaccard,
    jaccard_from_hamming,
    pack_bits,
    shingle_batch,
    shingle_set,
)
from attribution.analysis.store import TextStore
from attribution.errors import UserError
from attribution.io import atomic_path
from attribution.text import words

KINDS = ("auto", "flat", "hnsw", "ivf")
# Measured (docs/benchmarks.md): one-thread exhaustive Hamming search over 1M 256-bit codes takes
# ~13 ms, so exact search stays the default well past a million windows.
FLAT_MAX = 4_000_000


@dataclass(frozen=True)
class LexicalParams:
    """What a lexical index was built with; queries must use the same values."""

    ngram: int = 8
    num_perm: int = 256
    seed: int = 1
    window: int = 200
    stride: int = 100
    kind: str = "auto"

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise UserError("--ngram must be at least 1")
        if self.num_perm % 8 or self.num_perm <= 0:
            raise UserError("--num-perm must be a positive multiple of 8")
        if self.stride > self.window - self.ngram + 1:
            raise UserError(
                "window stride must be at most window - ngram + 1, or some n-grams are never indexed"
            )
        if self.kind not in KINDS:
            raise UserError(f"lexical index kind must be one of {', '.join(KINDS)}")


def _distinct_counts(flat: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Number of distinct hashes in each run of `flat` (set sizes, for containment estimates).

    One uint64 sort instead of a two-key sort: the key is the run id in the top 24 bits and the
    hash's top 40 bits below it. Two different shingles of one window collide with probability
    2**-40, and a batch holds far fewer than 2**24 windows.
    """
    if not len(flat):
        return np.zeros(len(counts), dtype=np.int32)
    if len(counts) >= 1 << 24:
        raise ValueError("too many windows in one batch")
    seg = np.repeat(np.arange(len(counts), dtype=np.uint64), counts)
    key = np.sort((seg << np.uint64(40)) | (flat >> np.uint64(24)))
    new = np.ones(len(key), dtype=bool)
    new[1:] = key[1:] != key[:-1]
    return np.bincount((key[new] >> np.uint64(40)).astype(np.int64), minlength=len(counts)).astype(np.int32)


def sign_texts(texts: list[str], params: LexicalParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signatures of every window of every text: `(signatures uint32 [w, k], window_doc int64 [w], set_size int32 [w])`.

    `window_doc` holds positions in `texts`; a text without a single n-gram gets one empty window,
    so every document has at least one row.
    """
    word_lists: list[list[str]] = []
    owners: list[int] = []
    for i, text in enumerate(texts):
        toks = words(text)
        spans = windows(len(toks), params.window, params.stride) or [(0, 0)]
        for s, e in spans:
            word_lists.append(toks[s:e])
            owners.append(i)
    flat, counts = shingle_batch(word_lists, params.ngram)
    sigs = MinHasher(params.num_perm, params.seed).signatures(flat, counts)
    return sigs, np.asarray(owners, dtype=np.int64), _distinct_counts(flat, counts)


def _sign_job(args: tuple[list[str], LexicalParams]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return sign_texts(*args)


class Signer:
    """Signs batches of texts on `jobs` worker processes (numpy's element-wise ops use one core each)."""

    def __init__(self, params: LexicalParams, jobs: int | None = None, batch: int = 2000):
        self.params = params
        self.jobs = max(1, jobs or os.cpu_count() or 1)
        self.batch = batch
        self._pool = None
        if self.jobs > 1:
            import multiprocessing as mp

            # spawn, not fork: the parent may hold torch/OpenMP threads that a fork would copy mid-flight.
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=mp.get_context("spawn"))

    def sign(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = [texts[i : i + self.batch] for i in range(0, len(texts), self.batch)]
        if self._pool is None or len(parts) == 1:
            results = [sign_texts(p, self.params) for p in parts]
        else:
            results = list(self._pool.map(_sign_job, [(p, self.params) for p in parts]))
        if not results:
            k = self.params.num_perm
            return np.zeros((0, k), np.uint32), np.zeros(0, np.int64), np.zeros(0, np.int32)
        base = np.cumsum([0] + [len(p) for p in parts[:-1]])
        return (
            np.concatenate([r[0] for r in results]),
            np.concatenate([r[1] + b for r, b in zip(results, base, strict=True)]),
            np.concatenate([r[2] for r in results]),
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> Signer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _new_binary_index(kind: str, bits: int, codes: np.ndarray):
    import faiss

    n = len(codes)
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX else "ivf"
    if kind == "flat":
        return faiss.IndexBinaryFlat(bits), "flat"
    if kind == "hnsw":
        return faiss.index_binary_factory(bits, "BHNSW32"), "hnsw"
    nlist = int(max(1, min(4 * np.sqrt(max(n, 1)), n // 39)))
    index = faiss.index_binary_factory(bits, f"BIVF{nlist}")
    sample = codes[np.random.default_rng(0).permutation(n)[: max(nlist * 64, 10_000)]]
    index.train(sample)
    return index, "ivf"


class LexicalIndex:
    """Files: `lexical/signatures.npy`, `window_doc.npy`, `set_size.npy`, `codes.faiss` (+ params in meta.json)."""

    def __init__(self, directory: Path, params: LexicalParams, kind: str, store: TextStore):
        import faiss

        self.directory = Path(directory)
        self.params = params
        self.kind = kind
        self.store = store
        self.signatures = np.load(self.directory / "signatures.npy", mmap_mode="r")
        self.window_doc = np.load(self.directory / "window_doc.npy", mmap_mode="r")
        self.set_size = np.load(self.directory / "set_size.npy", mmap_mode="r")
        self.index = faiss.read_index_binary(str(self.directory / "codes.faiss"))
        if kind == "hnsw":
            self.index.hnsw.efSearch = 256
        elif kind == "ivf":
            self.index.nprobe = 16
        self.hasher = MinHasher(params.num_perm, params.seed)

    @staticmethod
    def write(
        directory: Path,
        params: LexicalParams,
        sigs: np.ndarray,
        window_doc: np.ndarray,
        set_size: np.ndarray,
        append: bool = False,
    ) -> str:
        """Write (or extend, with `append`) the on-disk index; returns the FAISS index kind used."""
        import faiss

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if append:
            sigs = np.concatenate([np.load(directory / "signatures.npy"), sigs])
            window_doc = np.concatenate([np.load(directory / "window_doc.npy"), window_doc])
            set_size = np.concatenate([np.load(directory / "set_size.npy"), set_size])
        codes = pack_bits(sigs)
        if append:  # every FAISS kind can add; an IVF index keeps the centroids it was trained on
            index = faiss.read_index_binary(str(directory / "codes.faiss"))
            kind = _binary_kind(index)
            index.add(codes[index.ntotal :])
        else:
            index, kind = _new_binary_index(params.kind, params.num_perm, codes)
            for i in tqdm(
                range(0, len(codes), 100_000), desc="lexical index", unit="100k", disable=len(codes) < 200_000
            ):
                index.add(codes[i : i + 100_000])
        for name, arr in (
            ("signatures.npy", sigs),
            ("window_doc.npy", window_doc),
            ("set_size.npy", set_size),
        ):
            with atomic_path(directory / name) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, arr)
        with atomic_path(directory / "codes.faiss") as tmp:
            faiss.write_index_binary(index, str(tmp))
        return kind

    def query_sets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The query's exact shingle set and its MinHash signature."""
        q = shingle_set(text, self.params.ngram)
        return q, self.hasher.signature(q)

    def search(self, text: str, k: int = 10, candidates: int | None = None) -> list[tuple[int, float, float]]:
        """Top-k documents as `(row, exact containment of the query in the document, estimated Jaccard)`.

        FAISS returns the `candidates` nearest windows by Hamming distance (default max(3k, 100));
        their documents are re-ranked by exact containment, ties broken by the best window's Jaccard
        estimate. Documents that share no n-gram with the query are left out, so fewer than k may
        come back; a query with no n-gram (fewer words than n) returns none.
        """
        q, sig = self.query_sets(text)
        if not len(q) or self.index.ntotal == 0:
            return []
        n_cand = min(self.index.ntotal, candidates or max(3 * k, 100))
        dist, ids = self.index.search(pack_bits(sig[None, :]), n_cand)
        valid = ids[0] >= 0
        jac = jaccard_from_hamming(dist[0][valid], self.params.num_perm)
        order = np.argsort(-jac, kind="stable")
        doc_rows = np.asarray(self.window_doc[ids[0][valid][order]])
        uniq, first = np.unique(doc_rows, return_index=True)  # a document's best window
        best = dict(zip(uniq.tolist(), jac[order][first].tolist(), strict=True))
        rows = list(best)
        exact = self.containment_of(q, rows)
        scored = [(r, float(c), best[r]) for r, c in zip(rows, exact, strict=True) if c > 0]
        # sharing no n-gram is not a lexical match, whatever the Hamming noise says
        scored.sort(key=lambda t: (-t[1], -t[2], t[0]))
        return scored[:k]

    def containment_of(self, q: np.ndarray, rows: list[int]) -> np.ndarray:
        """Exact containment of the shingle set `q` in each document row, all rows in one numpy pass."""
        if not len(q) or not rows:
            return np.zeros(len(rows))
        flat, counts = shingle_batch([words(self.store[r]) for r in rows], self.params.ngram)
        hit = np.isin(flat, q)
        seg = np.repeat(np.arange(len(rows)), counts)
        matched = _distinct_counts(flat[hit], np.bincount(seg[hit], minlength=len(rows)))
        return matched / len(q)

    def estimates(self, text: str, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """MinHash estimates from the stored signatures alone (no texts read): per document, the best
        window's Jaccard similarity with the query and containment of the query in that window."""
        q, sig = self.query_sets(text)
        jac, con = np.zeros(len(rows)), np.zeros(len(rows))
        lo = np.searchsorted(self.window_doc, rows, side="left")
        hi = np.searchsorted(self.window_doc, rows, side="right")
        for i, (a, b) in enumerate(zip(lo, hi, strict=True)):
            if b > a and len(q):
                sigs = np.asarray(self.signatures[a:b])
                jac[i] = estimate_jaccard(sig, sigs).max()
                con[i] = estimate_containment(sig, sigs, len(q), np.asarray(self.set_size[a:b])).max()
        return jac, con

    def containment(self, text: str, rows: list[int]) -> np.ndarray:
        """Exact containment of the query's n-grams in each given document (same hashing as `search`)."""
        return self.containment_of(shingle_set(text, self.params.ngram), rows)

    def params_dict(self) -> dict:
        return asdict(self.params)


def _binary_kind(index) -> str:
    import faiss

    if isinstance(index, faiss.IndexBinaryHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexBinaryIVF):
        return "ivf"
    return "flat"
