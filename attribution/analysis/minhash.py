"""Word n-gram shingles hashed to uint64, and MinHash signatures computed as one numpy array op.

Why this shape: hashing every shingle once to a 64-bit integer, then applying the whole family of
`k` hash functions as a single `[n_shingles, k]` multiply-add-shift and a segmented min, keeps the
Python work per document to one regex and a dictionary look-up per word. That is what makes tens of
thousands of documents per second possible on a laptop-class CPU.

Definitions match `attribution.text`: a shingle is a tuple of `n` consecutive lower-cased `\\w+`
words, so a MinHash estimate here estimates exactly `attribution.text.jaccard` / `containment`.

Hash family: Dietzfelbinger's multiply-add-shift, `h_i(x) = ((a_i * x + b_i) mod 2**64) >> 32` for a
32-bit key `x` and random 64-bit `a_i` (odd), `b_i`. It is strongly universal from 32-bit keys to
32-bit values, which is all MinHash needs; `mod 2**64` is free in uint64 arithmetic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attribution.text import words

EMPTY = np.uint32(0xFFFFFFFF)  # the minimum over an empty shingle set
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_ROLL = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier that combines word hashes into a shingle hash
_CACHE_LIMIT = 4_000_000


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: spreads the bits of an array of uint64 (in place on a copy)."""
    x = x ^ (x >> np.uint64(30))
    x *= _C1
    x ^= x >> np.uint64(27)
    x *= _C2
    x ^= x >> np.uint64(31)
    return x


class WordHasher:
    """Stable 64-bit word hashes (blake2b), memoized: corpora repeat words, so most calls are look-ups.

    Python's built-in `hash` is salted per process, which would make signatures differ between the
    process that built an index and the one that queries it.
    """

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    def __call__(self, toks: Sequence[str]) -> np.ndarray:
        cache = self._cache
        try:
            return np.array([cache[w] for w in toks], dtype=np.uint64)
        except KeyError:
            pass
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        for w in toks:
            if w not in cache:
                cache[w] = int.from_bytes(
                    hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little"
                )
        return np.array([cache[w] for w in toks], dtype=np.uint64)


_HASHER = WordHasher()


def shingle_hashes_from_words(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every run of `n` consecutive words (with repeats), in text order."""
    m = len(word_hashes) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    acc = word_hashes[:m].copy()
    for j in range(1, n):
        acc *= _ROLL
        acc += word_hashes[j : j + m]
    return _mix64(acc)


def shingle_batch(word_lists: Sequence[Sequence[str]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of many word lists at once: `(flat uint64 hashes, count per list)`.

    One dictionary pass and one rolling hash over the concatenation, then the shingles that would
    straddle two lists are dropped; per-list numpy calls would cost more than the hashing itself.
    """
    lengths = np.fromiter((len(w) for w in word_lists), dtype=np.int64, count=len(word_lists))
    counts = np.maximum(lengths - n + 1, 0)
    total = int(lengths.sum())
    if total < n:
        return np.zeros(0, dtype=np.uint64), counts
    all_words = [w for ws in word_lists for w in ws]
    rolled = shingle_hashes_from_words(_HASHER(all_words), n)
    ends = np.repeat(np.cumsum(lengths), lengths)[: len(rolled)]
    keep = np.arange(len(rolled)) + n <= ends
    return rolled[keep], counts


def shingle_set(text: str, n: int) -> np.ndarray:
    """Sorted unique uint64 hashes of the text's word n-grams: the set `attribution.text.ngrams` builds."""
    return np.unique(shingle_hashes_from_words(_HASHER(words(text)), n))


@dataclass(frozen=True)
class MinHasher:
    """A fixed family of `k` hash functions; the seed is stored with an index so queries use the same family."""

    k: int = 256
    seed: int = 1

    def __post_init__(self) -> None:
        if self.k % 8:
            raise ValueError("k must be a multiple of 8 (signatures are packed to bytes)")
        rng = np.random.Generator(np.random.PCG64(self.seed))
        a = rng.integers(0, 2**63, size=self.k, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        b = rng.integers(0, 2**63, size=self.k, dtype=np.uint64) * np.uint64(2)
        object.__setattr__(self, "_a", a)
        object.__setattr__(self, "_b", b)

    def signatures(self, flat: np.ndarray, counts: np.ndarray, block: int = 512) -> np.ndarray:
        """MinHash signatures, uint32 `[len(counts), k]`, of sets given as consecutive runs of `flat`.

        `counts[i]` hashes of `flat` belong to set i. Repeats inside a set are harmless (min is
        idempotent); an empty set gets the all-`EMPTY` signature. About `block` shingles are done at
        a time, which keeps the `[block, k]` working array inside the CPU cache.
        """
        counts = np.asarray(counts, dtype=np.int64)
        out = np.full((len(counts), self.k), EMPTY, dtype=np.uint32)
        nonempty = np.flatnonzero(counts)
        if not len(nonempty):
            return out
        keys = flat >> np.uint64(32)
        seg = counts[nonempty]
        starts = np.concatenate([[0], np.cumsum(seg)[:-1]])
        a, b = self._a, self._b  # type: ignore[attr-defined]
        # Whole sets per block, so a segmented min never straddles two blocks.
        lo = 0
        while lo < len(nonempty):
            hi = max(int(np.searchsorted(starts, starts[lo] + block, side="left")), lo + 1)
            s0 = starts[lo]
            s1 = starts[hi] if hi < len(starts) else len(keys)
            work = keys[s0:s1, None] * a[None, :]
            work += b[None, :]
            # `>> 32` is monotone, so it commutes with min: shift the k minima, not the whole block.
            mins = np.minimum.reduceat(work, starts[lo:hi] - s0, axis=0)
            out[nonempty[lo:hi]] = mins >> np.uint64(32)
            lo = hi
        return out

    def signatures_of(self, sets: Sequence[np.ndarray]) -> np.ndarray:
        """Signatures of separately given hash arrays (convenience over `signatures`)."""
        counts = np.fromiter((len(x) for x in sets), dtype=np.int64, count=len(sets))
        flat = np.concatenate(list(sets)) if len(sets) else np.zeros(0, dtype=np.uint64)
        return self.signatures(flat.astype(np.uint64, copy=False), counts)

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        return self.signatures_of([shingles])[0]


def pack_bits(signatures: np.ndarray) -> np.ndarray:
    """1-bit MinHash codes: the lowest bit of each of the k values, packed to `[n, k/8]` uint8.

    Two codes agree on a bit with probability J + (1 - J) / 2, so Hamming distance d over k bits
    estimates J as 1 - 2 d / k: what FAISS binary indexes search on.
    """
    return np.packbits((signatures & 1).astype(np.uint8), axis=1)


def jaccard_from_hamming(distance: np.ndarray, k: int) -> np.ndarray:
    return np.clip(1.0 - 2.0 * np.asarray(distance, dtype=np.float64) / k, 0.0, 1.0)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Fraction of agreeing MinHash values (rows broadcast); 0 when either set is empty."""
    sig_a, sig_b = np.atleast_2d(sig_a), np.atleast_2d(sig_b)
    equal = (sig_a == sig_b).mean(axis=1)
    empty = (sig_a == EMPTY).all(axis=1) | (sig_b == EMPTY).all(axis=1)
    return np.where(empty, 0.0, equal)


def estimate_containment(
    sig_a: np.ndarray, sig_b: np.ndarray, size_a: np.ndarray | int, size_b: np.ndarray | int
) -> np.ndarray:
    """|A ∩ B| / |A| from a Jaccard estimate and the two exact set sizes.

    |A ∩ B| = J (|A| + |B|) / (1 + J); the set sizes are stored with each signature, so only the
    intersection is estimated.
    """
    j = estimate_jaccard(sig_a, sig_b)
    size_a = np.asarray(size_a, dtype=np.float64)
    size_b = np.asarray(size_b, dtype=np.float64)
    inter = j * (size_a + size_b) / (1.0 + j)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(size_a > 0, inter / np.maximum(size_a, 1.0), 0.0)
    return np.clip(c, 0.0, 1.0)
