"""Sketch index query time (the run's float16 exhaustive index, beside float32 flat) and the claim-gradient time.

Small by default (seconds, 20k vectors, the test-micro model). The full size, on an idle machine:

    .venv/bin/python benchmarks/sketch_query.py --n 1000000 --preset gpt2-small --device cuda

1. `--n` synthetic vectors of `--dim` (default: the run default, 256) in the index a run writes
   (`attribution.train.sketch.make_index`, float16) and in a float32 `IndexFlatIP`; p50/p95 of
   single-claim top-`--k` searches (target: < 50 ms p50 at 1M), one batched search of all queries, and
   the float16 index's recall of the float32 top k;
2. the claim side: one `--seq-len` claim's sketched gradient at one kept checkpoint for the preset's model,
   p50 over repeats, for the in-run sketch (forward, backward to the captured factors, tensor first stage,
   mixing) and for the checkpoint index (forward, dense backward, unit norm, count sketch); a claim costs
   that times the number of kept checkpoints.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _search_times(index, q: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    index.search(q[:1], k)  # warm up
    times = []
    for i in range(len(q)):
        t0 = time.perf_counter()
        index.search(q[i : i + 1], k)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    index.search(q, k)
    return 1000 * np.asarray(times), 1000 * (time.perf_counter() - t0) / len(q)


def query_times(n: int, dim: int, queries: int, k: int, seed: int = 0) -> dict[str, float]:
    """Single-claim search times of the run's index (`make_index`: float16) beside a float32 `IndexFlatIP`.

    Both are exhaustive; `recall_vs_float32` is the share of the float32 index's top k that the float16
    index returns (what float16 storage costs in exactness)."""
    import faiss

    from attribution.train.sketch import make_index

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32) * 1e-6  # the small scale of real sketch entries
    q = rng.standard_normal((queries, dim), dtype=np.float32)
    faiss.cvar.distance_compute_blas_threshold = 1  # one float32 query is a BLAS gemv over all threads
    flat = faiss.IndexFlatIP(dim)
    flat.add(x)
    flat_ms, flat_batched = _search_times(flat, q, k)
    _, want = flat.search(q, k)
    del flat
    index, _ = make_index(x)
    del x
    ms, batched = _search_times(index, q, k)
    _, got = index.search(q, k)
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(want, got, strict=True)]))
    return {
        "n": n,
        "dim": dim,
        "k": k,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "batched_ms_per_query": batched,
        "float32_flat_p50_ms": float(np.percentile(flat_ms, 50)),
        "float32_flat_batched_ms_per_query": flat_batched,
        "recall_vs_float32": recall,
        "threads": faiss.omp_get_max_threads(),
        "index_gib": n * dim * 2 / 2**30,
    }


def claim_gradient_times(
    preset: str, dim: int, seq_len: int | None, device: str, repeats: int
) -> dict[str, float]:
    import torch

    from attribution.engine.rules import trainable_params
    from attribution.engine.task import LanguageModelingTask
    from attribution.train import loop
    from attribution.train.config import RunConfig
    from attribution.train.sketch import make_projection, model_params
    from attribution.workflows import checkpoint_similarity as cs
    from attribution.workflows.checkpoint_sketch import CountSketch
    from attribution.workflows.claim_fast import _Gradients

    cfg = RunConfig(preset=preset, val={"x": "unused"}, device=device, seq_len=seq_len).resolved()
    dev, dtype = loop.resolve_device(cfg)
    model = loop.build_model(cfg, dev, "float32")
    projection = make_projection(model_params(model)[0], dim, seed=0)
    grads = _Gradients(model, projection)
    ids = np.random.default_rng(0).integers(0, 50257, (1, cfg.seq_len)).astype(np.int64)
    mask = np.ones_like(ids)
    params = trainable_params(model)
    seqs = cs.Sequences(ids, mask, np.zeros(1, dtype=np.int64), 1)
    count = CountSketch(sum(p.numel() for _, p in params.values()), dim, 0, 0, dev, torch.float32)
    times, dense = [], []
    for _ in range(repeats + 1):
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        kron = grads.kron(ids, mask, np.zeros(1, dtype=np.int64), 1)
        projection.mix(kron, 0)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()  # the checkpoint index's claim side: a dense gradient, unit, count sketch
        count(cs._unit(cs.gradients(model, LanguageModelingTask(), seqs, params)))
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        dense.append(time.perf_counter() - t0)
    return {
        "preset": preset,
        "seq_len": cfg.seq_len,
        "device": dev,
        "width": projection.width,
        "per_checkpoint_s": float(np.median(times[1:])),
        "checkpoint_index_per_checkpoint_s": float(np.median(dense[1:])),
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
