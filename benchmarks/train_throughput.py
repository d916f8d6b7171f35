"""Training throughput, plain vs valued, for a preset; measured side by side in one process.

Rounds alternate plain steps and valued steps (first order, and second order with --order2) on
the same model and batches, because a shared machine's speed drifts; the medians and their ratio
are printed as JSON and as a Markdown table row. The validation sets have the shape of the demo's
(`rewrites` and `news`: 8 sequences each, per-example values on).

    .venv/bin/python benchmarks/train_throughput.py --preset cpu-tiny --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-tiny")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps per mode per round")
    ap.add_argument("--val-seqs", type=int, default=8, help="sequences per validation set (two sets)")
    ap.add_argument("--order2", action="store_true", help="also time second-order values")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from attribution.engine.task import LanguageModelingTask
    from attribution.engine.valuer import ValSet, Valuer
    from attribution.train.config import RunConfig
    from attribution.train.loop import build_model, build_optimizer

    cfg = RunConfig(val={"x": "x"}, preset=args.preset, device=args.device).resolved()
    model = build_model(cfg, args.device, "float32")
    opt = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)
    T, B = cfg.seq_len, cfg.batch_size

    def batch(n: int) -> torch.Tensor:
        return torch.randint(0, 50256, (n, T), generator=gen).to(args.device)

    sets = {"rewrites": ValSet(batch(args.val_seqs)), "news": ValSet(batch(args.val_seqs))}
    valuers = {"valued-1st": Valuer(model, sets, order=1, per_example=list(sets))}
    if args.order2:
        valuers["valued-2nd"] = Valuer(model, sets, order=2, per_example=list(sets))
    task = LanguageModelingTask()
    params = [p for p in model.parameters() if p.requires_grad]
    times: dict[str, list[float]] = {"plain": [], **{k: [] for k in valuers}}

    def step(mode: str) -> None:
        ids = batch(B)
        if mode == "plain":
            task.per_sequence_loss(model, ids, None).mean().backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
        else:
            v = valuers[mode]
            v.forward_backward(ids, None)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            v.values(cfg.lr, grad_scale=float(torch.clamp(cfg.clip / (norm + 1e-6), max=1.0)))
            opt.step()
            v.after_step()
        opt.zero_grad(set_to_none=True)

    for mode in times:  # warm-up
        step(mode)
    for _ in range(args.rounds):
        for mode in times:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(mode)
            times[mode].append((time.perf_counter() - t0) / args.steps)
    tokens = B * T
    result = {
        "preset": args.preset,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "tokens_per_step": tokens,
        "tokens_per_s": {m: tokens / statistics.median(t) for m, t in times.items()},
        "s_per_step": {m: statistics.median(t) for m, t in times.items()},
        "slowdown_vs_plain": {
            m: statistics.median(t) / statistics.median(times["plain"]) for m, t in times.items()
        },
        "all_s_per_step": times,
    }
    print(json.dumps(result, indent=2))
    tps = result["tokens_per_s"]
    print("| " + " | ".join(f"{m}: {tps[m]:,.0f} tok/s" for m in tps) + " |")
    _ = np  # numpy imported for torch interop on some builds


if __name__ == "__main__":
    main()
