"""Time of one valued step's `values()` on the copyright experiment's shape.

Four per-example validation sets of 60 sequences x 64 tokens (8 originals' variants), the `cpu-tiny`
GPT-2 with its 50,257-row tied head, a batch of 16 x 64 training tokens, AdamW-aware values and
gradient norms on (as the experiment runs them). Prints the forward/backward and `values()` seconds
per step; run it with and without the allocator settings of `attribution/memory.py` to compare:

    .venv/bin/python benchmarks/valuer_step.py
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776 .venv/bin/python benchmarks/valuer_step.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    from attribution.engine.valuer import ValSet, Valuer
    from attribution.train import RunConfig
    from attribution.train.loop import build_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    ap.add_argument("--sets", type=int, default=4)
    ap.add_argument("--val-seqs", type=int, default=60)
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = RunConfig(val={"x": "x"}).resolved()
    model = build_model(cfg, "cpu", "float32")
    model = model[0] if isinstance(model, tuple) else model
    vocab, t = model.config.vocab_size, cfg.seq_len
    sets = {f"set{i}": ValSet(torch.randint(0, vocab, (args.val_seqs, t))) for i in range(args.sets)}
    valuer = Valuer(model, sets, per_example=list(sets), optimizer_aware=True, grad_norms=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    fb, val = [], []
    for step in range(args.steps + 1):
        ids = torch.randint(0, vocab, (cfg.batch_size, t))
        t0 = time.perf_counter()
        valuer.forward_backward(ids)
        t1 = time.perf_counter()
        valuer.values(cfg.lr, optimizer=opt)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # the first step warms up allocations and plans
            fb.append(t1 - t0)
            val.append(t2 - t1)
    print(
        json.dumps(
            {
                "forward_backward_s": round(statistics.median(fb), 2),
                "values_s": round(statistics.median(val), 2),
                "steps": args.steps,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
