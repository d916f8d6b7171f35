"""The `materialize` strategy's row block (`SCORE_BLOCK_BYTES`) on one shape: seconds per score, by budget.

Why: scoring the tied head builds every training sample's `[rows, d]` gradient block by block and dots it
with the validation side's rows; the block's size decides whether it stays in cache. The default was
chosen on the demo's shape; this script measures the budgets on any other (the held-out check in
docs/benchmarks.md, "Session 22"). One process, the budgets alternating round by round, medians.

    python benchmarks/score_block.py --n 16 --d 64 --groups 16 --budgets 1,2,4,8,16,64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attribution.engine.rules import Use
from attribution.engine.strategies import materialize as mat


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="training samples (sequences)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per sample")
    ap.add_argument("--d", type=int, default=64, help="model width (the head's columns)")
    ap.add_argument("--vocab", type=int, default=50257, help="the head's rows")
    ap.add_argument("--groups", type=int, default=16, help="validation columns scored at once")
    ap.add_argument("--budgets", default="1,2,4,8,16,64", help="SCORE_BLOCK_BYTES to try, in MiB")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    n, t, d, v = args.n, args.tokens, args.d, args.vocab
    uses = [  # the tied head's two uses: the output layer (dense) and the embedding (token rows)
        Use(torch.randn(n, t, v, generator=gen), torch.randn(n, t, d, generator=gen)),
        Use(torch.randint(0, v, (n, t), generator=gen), torch.randn(n, t, d, generator=gen), True),
    ]
    g = torch.randn(args.groups, v, d, generator=gen)
    budgets = [float(b) for b in args.budgets.split(",")]
    times: dict[float, list[float]] = {b: [] for b in budgets}
    ref = None
    for r in range(args.rounds + 1):  # round 0 warms up
        for b in budgets:
            mat.SCORE_BLOCK_BYTES = int(b * (1 << 20))
            start = time.perf_counter()
            out = mat.score_materialized(uses, (v, d), g, torch.float32)
            if r:
                times[b].append(time.perf_counter() - start)
            ref = out if ref is None else ref
            assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    best = min(statistics.median(ts) for ts in times.values())
    print(f"n={n} tokens={t} d={d} vocab={v} groups={args.groups}, {torch.get_num_threads()} threads")
    for b, ts in times.items():
        m = statistics.median(ts)
        mat.SCORE_BLOCK_BYTES = int(b * (1 << 20))
        rows = mat.score_block(n, (v, d), 4)
        print(f"{b:6g} MiB ({rows:6d} rows): {m * 1e3:8.1f} ms  {m / best:5.2f}x the best")


if __name__ == "__main__":
    main()
