"""PyTorch's cross-entropy against the Task's lean one: forward and backward of `[N, 50257]` logits.

Both run alternately in one process (this machine is noisy), with the allocator settings `attribution`
uses (run it as `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776 .venv/bin/python
benchmarks/cross_entropy.py`), and the median of the repetitions is printed with the ratio.

    .venv/bin/python benchmarks/cross_entropy.py --rows 1024 --reps 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from attribution.engine.task import token_cross_entropy


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024, help="token positions (cpu-tiny's batch: 16 x 64)")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--reps", type=int, default=9, help="timed repetitions of each (one warm-up more)")
    args = ap.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(args.rows, args.vocab, generator=gen) * 2
    labels = torch.randint(0, args.vocab, (args.rows,), generator=gen)
    weights = torch.rand(args.rows, generator=gen)
    losses = {
        "torch": lambda x: F.cross_entropy(x, labels, reduction="none"),
        "lean": lambda x: token_cross_entropy(x, labels),
    }

    def once(loss) -> float:
        x = logits.clone().requires_grad_()
        start = time.perf_counter()
        (loss(x * 1.0) * weights).sum().backward()  # `x * 1.0`: logits with a producer, as a head's are
        return time.perf_counter() - start

    times: dict[str, list[float]] = {k: [] for k in losses}
    for rep in range(args.reps + 1):
        for name, loss in losses.items():
            elapsed = once(loss)
            if rep:
                times[name].append(elapsed)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"[{args.rows}, {args.vocab}] forward+backward, median of {args.reps}: "
        f"F.cross_entropy {med['torch'] * 1e3:.1f} ms, lean {med['lean'] * 1e3:.1f} ms "
        f"({med['lean'] / med['torch']:.2f}x)"
    )
    return med


if __name__ == "__main__":
    main()
