"""Sketch index query time (FAISS flat inner product) and the claim-gradient time, separately.

Small by default (seconds, 20k vectors, the test-micro model). The full size, on an idle machine:

    .venv/bin/python benchmarks/sketch_query.py --n 1000000 --preset gpt2-small --device cuda

1. `--n` synthetic vectors of `--dim` (default: the run default, 256) in an `IndexFlatIP`; p50/p95 of
   single-claim top-`--k` searches (target: < 50 ms p50 at 1M), and of one batched search of all queries;
2. the claim side: one `--seq-len` claim's sketched gradient at one kept checkpoint (forward, backward to
   the captured factors, Kronecker projection, segment mixing) for the preset's model, p50 over repeats;
   a claim costs that times the number of kept checkpoints.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def query_times(n: int, dim: int, queries: int, k: int, seed: int = 0) -> dict[str, float]:
    import faiss

    rng = np.random.default_rng(seed)
    index = faiss.IndexFlatIP(dim)
    for s in range(0, n, 100_000):
        index.add(rng.standard_normal((min(100_000, n - s), dim), dtype=np.float32))
    q = rng.standard_normal((queries, dim), dtype=np.float32)
    faiss.cvar.distance_compute_blas_threshold = 1  # one query is a BLAS gemv over all threads, not one scan
    index.search(q[:1], k)  # warm up
    times = []
    for i in range(queries):
        t0 = time.perf_counter()
        index.search(q[i : i + 1], k)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    index.search(q, k)
    batch = time.perf_counter() - t0
    ms = 1000 * np.asarray(times)
    return {
        "n": n,
        "dim": dim,
        "k": k,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "batched_ms_per_query": 1000 * batch / queries,
        "threads": faiss.omp_get_max_threads(),
        "index_gib": n * dim * 4 / 2**30,
    }


def claim_gradient_times(
    preset: str, dim: int, seq_len: int | None, device: str, repeats: int
) -> dict[str, float]:
    import torch

    from attribution.train import loop
    from attribution.train.config import RunConfig
    from attribution.train.sketch import Projection, model_params
    from attribution.workflows.claim_fast import _Gradients

    cfg = RunConfig(preset=preset, val={"x": "unused"}, device=device, seq_len=seq_len).resolved()
    dev, dtype = loop.resolve_device(cfg)
    model = loop.build_model(cfg, dev, "float32")
    projection = Projection(model_params(model)[0], dim, seed=0)
    grads = _Gradients(model, projection)
    ids = np.random.default_rng(0).integers(0, 50257, (1, cfg.seq_len)).astype(np.int64)
    mask = np.ones_like(ids)
    times = []
    for _ in range(repeats + 1):
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        kron = grads.kron(ids, mask, np.zeros(1, dtype=np.int64), 1)
        projection.mix(kron, 0)
        times.append(time.perf_counter() - t0)
    return {
        "preset": preset,
        "seq_len": cfg.seq_len,
        "device": dev,
        "width": projection.width,
        "per_checkpoint_s": float(np.median(times[1:])),
    }


def main() -> None:
    from attribution.train.sketch import DEFAULT_DIM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="vectors in the index (full size: 1000000)")
    ap.add_argument("--dim", type=int, default=DEFAULT_DIM)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument(
        "--preset", default="test-micro", help="model of the claim-gradient timing (full: gpt2-small)"
    )
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    out = {
        "query": query_times(args.n, args.dim, args.queries, args.k),
        "claim_gradient": claim_gradient_times(
            args.preset, args.dim, args.seq_len, args.device, args.repeats
        ),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
