"""MinHash estimates against exact word n-gram measures (`attribution.text`), and the BM25 formula.

How "within +-0.05" is assessed: 1,000 random pairs whose true Jaccard similarity spreads over
(0, 1) (a random stretch of one text is embedded in filler, so overlaps are not all near zero, where
any estimator looks good). With k hash functions the standard error of a Jaccard estimate is
sqrt(J(1-J)/k): 0.031 at J = 0.5 for k = 256. So at k = 256 we require the *mean* absolute error to
be within 0.05 with margin (<= 0.03) and the errors to have the theoretical spread; for the
99th percentile to be within 0.05 the test uses k = 1024 (standard error <= 0.016).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from attribution.analysis.minhash import (
    MinHasher,
    estimate_containment,
    estimate_jaccard,
    jaccard_from_hamming,
    pack_bits,
    shingle_batch,
    shingle_set,
)
from attribution.text import containment, jaccard, ngrams, words


def _vocab() -> list[str]:
    import os

    import gensim

    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", "lee_background.cor")
    with open(path, encoding="latin-1") as fh:
        return sorted(set(words(fh.read())))


def _pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Pairs (a, b): b = filler + a random stretch of a (>= half of it) + filler; real English words."""
    rng = np.random.default_rng(seed)
    vocab = _vocab()
    out = []
    for _ in range(n):
        base = list(rng.choice(vocab, size=int(rng.integers(100, 200))))
        la = len(base)
        s = int(rng.integers(0, la // 2))
        e = int(rng.integers(s + la // 2, la + 1))
        filler = list(rng.choice(vocab, size=int(rng.integers(0, 100))))
        cut = int(rng.integers(0, len(filler) + 1))
        out.append((" ".join(base), " ".join(filler[:cut] + base[s:e] + filler[cut:])))
    return out


@pytest.fixture(scope="module")
def pairs():
    return _pairs(1000)


def _errors(pairs, k: int, n: int = 8):
    mh = MinHasher(k, seed=7)
    sets = [(shingle_set(a, n), shingle_set(b, n)) for a, b in pairs]
    sa = mh.signatures_of([x for x, _ in sets])
    sb = mh.signatures_of([y for _, y in sets])
    size_a = np.array([len(x) for x, _ in sets])
    size_b = np.array([len(y) for _, y in sets])
    j_true = np.array([jaccard(a, b, n) for a, b in pairs])
    c_true = np.array([containment(b, a, n) for a, b in pairs])  # how much of b is in a
    j_err = estimate_jaccard(sa, sb) - j_true
    c_err = estimate_containment(sb, sa, size_b, size_a) - c_true
    return j_true, j_err, c_true, c_err


def test_shingle_hashes_are_the_text_ngram_sets():
    a = "The cat sat on the mat, and the cat sat on the hat; then the dog sat on the mat too."
    b = "A dog sat on the mat, and the cat sat on the hat today while the bird sang loudly."
    for n in (1, 3, 5):
        assert len(shingle_set(a, n)) == len(ngrams(words(a), n))
        qa, qb = shingle_set(a, n), shingle_set(b, n)
        assert np.isin(qa, qb).mean() == pytest.approx(containment(a, b, n))
    flat, counts = shingle_batch([words(a), words(b), ["too", "short"]], 3)
    assert counts.tolist() == [len(words(a)) - 2, len(words(b)) - 2, 0]
    assert np.array_equal(np.unique(flat[: counts[0]]), shingle_set(a, 3))


def test_batched_signatures_equal_one_by_one():
    texts = [" ".join(p) for p in _pairs(20, seed=3)] + ["", "only three words"]
    mh = MinHasher(64, seed=5)
    flat, counts = shingle_batch([words(t) for t in texts], 5)
    batched = mh.signatures(flat, counts, block=37)  # blocks that cut across documents
    single = np.stack([mh.signature(shingle_set(t, 5)) for t in texts])
    assert np.array_equal(batched, single)
    assert (batched[-2:] == np.uint32(0xFFFFFFFF)).all()  # no 5-gram: the empty signature
    assert estimate_jaccard(batched[-1], batched[-1])[0] == 0.0


def test_jaccard_and_containment_estimates_k256(pairs):
    j_true, j_err, c_true, c_err = _errors(pairs, 256)
    assert 0.15 < j_true.mean() < 0.7 and j_true.std() > 0.1  # overlaps really spread out
    assert np.abs(j_err).mean() <= 0.03
    assert np.abs(c_err).mean() <= 0.03
    assert abs(j_err.mean()) < 0.005  # unbiased
    # the spread is the theoretical one: a biased or correlated hash family would fail this
    z = j_err / np.sqrt(np.clip(j_true * (1 - j_true), 1e-9, None) / 256)
    assert 0.8 < z.std() < 1.2
    assert (np.abs(j_err) <= 0.05).mean() >= 0.85


def test_estimates_within_005_at_99th_percentile_k1024(pairs):
    _, j_err, _, c_err = _errors(pairs, 1024)
    assert np.quantile(np.abs(j_err), 0.99) <= 0.05
    assert np.quantile(np.abs(c_err), 0.99) <= 0.05
    assert np.abs(j_err).mean() <= 0.015


def test_one_bit_codes_estimate_jaccard(pairs):
    j_true, *_ = _errors(pairs[:200], 8)
    mh = MinHasher(1024, seed=2)
    sa = mh.signatures_of([shingle_set(a, 8) for a, _ in pairs[:200]])
    sb = mh.signatures_of([shingle_set(b, 8) for _, b in pairs[:200]])
    ham = np.unpackbits(pack_bits(sa) ^ pack_bits(sb), axis=1).sum(axis=1)
    est = jaccard_from_hamming(ham, 1024)
    # 1-bit MinHash: standard error ~ 2 * sqrt(p(1-p)/k) with p = (1-J)/2, about 0.03 here
    assert np.abs(est - j_true).mean() < 0.035


def test_bm25_matches_the_documented_lucene_formula(tmp_path):
    from attribution.analysis.bm25 import BM25Index, BM25Params, build

    corpus = [
        "apple banana apple cherry",
        "banana cherry cherry cherry durian",
        "apple durian",
        "elderberry fig grape banana apple apple",
    ]
    build(tmp_path / "bm25", corpus, BM25Params(k1=1.2, b=0.75))
    index = BM25Index(tmp_path / "bm25")
    # By hand: tokens are the words (no stopwords, all >= 2 letters), |d| the token count.
    docs = [c.split() for c in corpus]
    n_docs, avgdl = len(docs), sum(map(len, docs)) / len(docs)

    def score(query: list[str], d: list[str]) -> float:
        total = 0.0
        for t in query:
            df = sum(t in doc for doc in docs)
            if df == 0:
                continue
            idf = math.log(1 + (n_docs - df + 0.5) / (df + 0.5))
            tf = d.count(t)
            total += idf * tf / (tf + 1.2 * (1 - 0.75 + 0.75 * len(d) / avgdl))
        return total

    for query in ("apple cherry", "durian", "banana fig unknownword", "grape grape apple"):
        expected = [score(query.split(), d) for d in docs]
        assert index.scores(query) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    top = index.search("cherry durian", 2)
    assert [r for r, _ in top] == [1, 2]
