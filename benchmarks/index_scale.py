"""Scale of the analysis indexes on a synthetic corpus of short documents.

    .venv/bin/python benchmarks/index_scale.py --n-docs 100000 --out /tmp/index_scale

Measures, through the real code path (`build_index`, `Indexes`):
- lexical signatures per second (wall and CPU seconds, `--jobs` processes), and the build of the
  FAISS binary index, the text store and BM25;
- p50 / p95 latency of a top-100 lexical query (MinHash candidates + exact containment re-rank) and
  whether an exact or partial copy of a document is ranked first;
- BM25 query latency; bytes on disk per component (scaled to a million documents);
- MiniLM embedding throughput on a sample (CPU-bound), and the FAISS float index memory and query
  time for random unit vectors standing in for embeddings at `--semantic-vectors` scale.

Documents are 30-80 words drawn from a Zipf distribution over real English words (gensim's test
corpora), so shingle statistics resemble text. Prints a JSON report and writes it to OUT/report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np


def vocabulary() -> list[str]:
    import gensim

    from attribution.text import words

    folder = Path(gensim.__file__).parent / "test" / "test_data"
    counts: dict[str, int] = {}
    for name in ("lee_background.cor", "lee.cor", "head500.noblanks.cor"):
        path = folder / name
        if path.exists():
            for w in words(path.read_text(encoding="latin-1")):
                counts[w] = counts.get(w, 0) + 1
    return sorted(counts, key=lambda w: -counts[w])


def synthetic_docs(n: int, seed: int = 0, block: int = 10_000):
    """Documents generated a block at a time, so a million of them never sit in memory at once."""
    from attribution.corpus import Document

    vocab = np.array(vocabulary(), dtype=object)
    rng = np.random.default_rng(seed)
    for start in range(0, n, block):
        m = min(block, n - start)
        lengths = rng.integers(30, 81, size=m)
        ranks = np.minimum(rng.zipf(1.3, size=int(lengths.sum())) - 1, len(vocab) - 1)
        tokens = vocab[ranks].tolist()
        ends = np.cumsum(lengths)
        for i in range(m):
            doc = start + i
            yield Document(f"s{doc}", " ".join(tokens[ends[i] - lengths[i] : ends[i]]), f"src{doc % 8}")


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def percentiles(xs: list[float], cpu: list[float] | None = None) -> dict[str, float]:
    """Wall-clock p50/p95 in ms, and the CPU-time p50 (what the query costs on a machine not shared)."""
    a = np.asarray(xs) * 1000
    out = {"p50_ms": round(float(np.median(a)), 2), "p95_ms": round(float(np.quantile(a, 0.95)), 2)}
    if cpu is not None:
        out["cpu_p50_ms"] = round(float(np.median(np.asarray(cpu) * 1000)), 2)
    return out


def bench_signing(n: int, jobs: int) -> dict:
    """Signatures alone, on pre-generated texts: the rate the acceptance criterion is about."""
    from attribution.analysis.lexical import LexicalParams, Signer, sign_texts

    texts = [d.text for d in synthetic_docs(n, seed=1)]
    params = LexicalParams()
    sign_texts(texts[:1000], params)  # warm caches
    c0, t0 = time.process_time(), time.perf_counter()
    sign_texts(texts, params)
    one_cpu, one_wall = time.process_time() - c0, time.perf_counter() - t0
    with Signer(params, jobs) as signer:
        signer.sign(texts[: 2 * signer.batch * jobs])  # start the workers
        t0 = time.perf_counter()
        signer.sign(texts)
        multi_wall = time.perf_counter() - t0
    return {
        "docs": n,
        "one_process_docs_per_s_wall": round(n / one_wall),
        "one_process_docs_per_s_cpu": round(n / one_cpu),
        f"{jobs}_processes_docs_per_s_wall": round(n / multi_wall),
        "load_average_1min": os.getloadavg()[0],
    }


def bench_lexical_bm25(n: int, out: Path, jobs: int, n_queries: int, bm25: bool = True) -> dict:
    from attribution.analysis.bm25 import BM25Params
    from attribution.analysis.index import Indexes, build_index

    t0, c0 = time.perf_counter(), time.process_time()
    meta = build_index(
        synthetic_docs(n),
        out,
        semantic=None,
        bm25=BM25Params() if bm25 else None,
        jobs=jobs,
        overwrite=True,
        batch=20_000,
    )
    build_wall, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    ix = Indexes.load(out)
    rng = np.random.default_rng(7)
    targets = rng.choice(n, size=n_queries, replace=False)
    lat, cpu, hit_exact, hit_partial, bm_lat = [], [], 0, 0, []
    filler = " ".join(next(synthetic_docs(1, seed=99)).text.split()[:15])
    for i, t in enumerate(targets):
        text = ix.store[int(t)]
        query = (
            text
            if i % 2 == 0
            else filler + " " + " ".join(text.split()[: max(20, len(text.split()) * 2 // 3)])
        )
        t1, c1 = time.perf_counter(), time.process_time()
        hits = ix.lexical.search(query, 100)
        lat.append(time.perf_counter() - t1)
        cpu.append(time.process_time() - c1)
        first = hits[0][0] if hits else -1
        if i % 2 == 0:
            hit_exact += first == t
        else:
            hit_partial += first == t
        if ix.bm25 is not None:
            t1 = time.perf_counter()
            ix.bm25.search(query, 100)
            bm_lat.append(time.perf_counter() - t1)
    sizes = {name: du(out / name) for name in ("lexical", "bm25") if (out / name).exists()}
    sizes["texts"] = (out / "texts.bin").stat().st_size + (out / "text_offsets.npy").stat().st_size
    codes_bytes = meta["lexical"]["n_windows"] * meta["lexical"]["params"]["num_perm"] // 8
    per_m = 1_000_000 / n
    return {
        "docs": n,
        "windows": meta["lexical"]["n_windows"],
        "lexical_kind": meta["lexical"]["kind"],
        "build_wall_s": round(build_wall, 1),
        "build_cpu_s_main_process": round(build_cpu, 1),
        "lexical_top100": percentiles(lat, cpu),
        "exact_copy_first": f"{hit_exact}/{(n_queries + 1) // 2}",
        "partial_copy_first": f"{hit_partial}/{n_queries // 2}",
        "bm25_top100": percentiles(bm_lat) if bm_lat else None,
        "disk_bytes_per_million_docs": {k: int(v * per_m) for k, v in sizes.items()},
        "faiss_codes_in_memory_bytes_per_million_docs": int(codes_bytes * per_m),
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }


def bench_bm25_from(index_dir: Path, n_queries: int = 50) -> dict:
    """BM25 alone over the texts of an index built earlier (e.g. the 1M run made with `--skip bm25`)."""
    from attribution.analysis.bm25 import BM25Index, BM25Params, build
    from attribution.analysis.store import TextStore

    store = TextStore(index_dir)
    texts = [store[i] for i in range(len(store))]
    out = index_dir.parent / "bm25_only"
    t0, c0 = time.perf_counter(), time.process_time()
    build(out, texts, BM25Params())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    index = BM25Index(out)
    lat, cpu_lat, hit = [], [], 0
    for r in np.random.default_rng(1).choice(len(texts), n_queries, replace=False):
        t1, c1 = time.perf_counter(), time.process_time()
        top = index.search(texts[r], 100)
        lat.append(time.perf_counter() - t1)
        cpu_lat.append(time.process_time() - c1)
        hit += top[0][0] == r
    return {
        "docs": len(texts),
        "build_wall_s": round(wall, 1),
        "build_cpu_s": round(cpu, 1),
        "top100": percentiles(lat, cpu_lat),
        "exact_copy_first": f"{hit}/{n_queries}",
        "disk_bytes": du(out),
    }


def bench_semantic(n_embed: int, n_vectors: int) -> dict:
    import faiss

    from attribution.analysis.semantic import SemanticParams, embed_windows

    texts = [d.text for d in synthetic_docs(n_embed, seed=3)]
    embed_windows(texts[:16], SemanticParams())  # load the model
    t0, c0 = time.perf_counter(), time.process_time()
    embed_windows(texts, SemanticParams())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n_vectors, 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    faiss.omp_set_num_threads(1)
    out: dict = {
        "embedded_docs": n_embed,
        "embed_docs_per_s_wall": round(n_embed / wall, 1),
        "embed_docs_per_s_cpu": round(n_embed / cpu, 1),
        "vectors": n_vectors,
    }
    for kind, index in (
        ("flat", faiss.IndexFlatIP(384)),
        ("hnsw32", faiss.IndexHNSWFlat(384, 32, faiss.METRIC_INNER_PRODUCT)),
    ):
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        t0 = time.perf_counter()
        index.add(vecs)
        build = time.perf_counter() - t0
        faiss.omp_set_num_threads(1)
        lat = []
        for q in vecs[:50]:
            t1 = time.perf_counter()
            index.search(q[None, :], 100)
            lat.append(time.perf_counter() - t1)
        size = len(faiss.serialize_index(index))
        out[kind] = {
            "build_s": round(build, 1),
            **percentiles(lat),
            "bytes_per_million_vectors": int(size * 1_000_000 / n_vectors),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-docs", type=int, default=100_000)
    ap.add_argument("--out", default="/tmp/index_scale")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--sign-docs", type=int, default=100_000)
    ap.add_argument("--embed-docs", type=int, default=500)
    ap.add_argument("--semantic-vectors", type=int, default=200_000)
    ap.add_argument("--bm25-from", default=None, help="only benchmark BM25 over this existing index's texts")
    ap.add_argument("--skip", nargs="*", default=[], choices=["signing", "lexical", "semantic", "bm25"])
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"cpu_count": os.cpu_count()}
    if args.bm25_from:
        report["bm25"] = bench_bm25_from(Path(args.bm25_from))
        print(json.dumps(report, indent=2))
        return
    if "signing" not in args.skip:
        report["signing"] = bench_signing(args.sign_docs, args.jobs)
        print(json.dumps(report["signing"]), flush=True)
    if "lexical" not in args.skip:
        report["lexical_bm25"] = bench_lexical_bm25(
            args.n_docs, out / "index", args.jobs, args.queries, bm25="bm25" not in args.skip
        )
        print(json.dumps(report["lexical_bm25"]), flush=True)
    if "semantic" not in args.skip:
        report["semantic"] = bench_semantic(args.embed_docs, args.semantic_vectors)
        print(json.dumps(report["semantic"]), flush=True)
    report["load_average_end"] = os.getloadavg()
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
