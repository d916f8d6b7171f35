"""Wall-time overhead of a valued training step over a plain one, measured side by side.

Each repetition runs every mode once, in turn (plain, first order, second order, optionally direct
per-sample gradients with torch.func vmap), on the same batch and copies of the same model (one per
valued mode, so each follows a run's own trajectory), so machine noise hits all modes alike; the report
gives the median of per-repetition ratios. A training step is the real loop step: zero_grad,
forward/backward, clip to 1.0, AdamW step (the valued modes add the Valuer's validation pass and scoring).

    python benchmarks/engine_overhead.py --model cpu-tiny --val-seqs 1 --val-len 32
    python benchmarks/engine_overhead.py --model gpt2-small-short --batch 4 --seq-len 64
    python benchmarks/engine_overhead.py --model gpt2-small --device cuda --dtype bf16   # GPU script

Prints a Markdown table and writes JSON with `--json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time

import torch
from transformers import GPT2LMHeadModel

from attribution.engine import ValSet, Valuer
from attribution.engine.task import LanguageModelingTask
from attribution.train.blocked_head import block_head
from attribution.train.loop import gpt2_config

MODELS = {  # (n_layer, n_embd, n_head, seq_len, batch): the CPU preset and GPT-2 small
    "cpu-tiny": (2, 128, 2, 128, 16),
    "gpt2-small-short": (12, 768, 12, 64, 4),
    "gpt2-small": (12, 768, 12, 1024, 16),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)


def build(args: argparse.Namespace):
    n_layer, n_embd, n_head, seq_len, batch = MODELS[args.model]
    seq_len = args.seq_len or seq_len
    batch = args.batch or batch
    cfg = gpt2_config(n_layer, n_head, n_embd, max(1024, seq_len))  # the product's model: no dropout
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).to(args.device)
    # as `attribution run` builds it (train.loop.build_model); the vmap mode needs a head torch.func can
    # transform, which the blocked head's custom Function is not, so with vmap the head is one GEMM
    if model.device.type == "cpu" and "vmap" not in args.modes.split(","):
        block_head(model.lm_head)
    opt = adamw(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (batch, seq_len), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    val = torch.randint(0, 50257, (args.val_seqs, args.val_len or seq_len), generator=g)
    return model, opt, ids, mask, ValSet(val, torch.ones_like(val))


def profile(fns: dict, modes: list[str], failed: dict, args: argparse.Namespace) -> None:
    """One step of each mode under torch.profiler: where the time goes (stderr, self time sorted)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for mode in modes:
        if mode in failed:
            continue
        _sync(args.device)
        with torch_profile(activities=activities) as prof:
            fns[mode]()
            _sync(args.device)
        print(f"\n## profile: {mode}", file=sys.stderr)
        print(prof.key_averages().table(sort_by=key, row_limit=args.profile), file=sys.stderr)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="cpu-tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast (GPU)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--val-seqs", type=int, default=1)
    ap.add_argument(
        "--val-len", type=int, default=32, help="tokens per validation sequence (0 = train length)"
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--modes", default="plain,order1,order2", help="comma list of plain,order1,order2,aware,vmap"
    )
    ap.add_argument("--strategy", default=None, help="force one strategy for every parameter")
    ap.add_argument(
        "--per-example",
        action="store_true",
        help="one value per validation sequence, as `attribution run` values small sets",
    )
    ap.add_argument(
        "--grad-norms",
        action="store_true",
        help="with --per-example: also the in-run cosine views' per-sample norms, as a run without a "
        "checkpoint view computes them (`attribution run --in-run-cosine`)",
    )
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plan", action="store_true", help="print the first-order plan")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, profile one step of each mode (torch.profiler) and print its top N ops",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, opt, ids, mask, vs = build(args)
    task = LanguageModelingTask()
    amp = torch.bfloat16 if args.dtype == "bf16" else None
    modes = args.modes.split(",")
    pe = {"per_example": ["val"], "grad_norms": args.grad_norms} if args.per_example else {}
    kinds = {"order1": {"order": 1}, "order2": {"order": 2}, "aware": {"order": 1, "optimizer_aware": True}}
    # Each valued mode trains its own copy of the model (the same weights: valued training leaves .grad as
    # plain training does), so a second-order step reuses its validation pass at w' as a run does; on one
    # shared model the other modes' steps would move w' and force a second pass per step.
    copies = {name: copy.deepcopy(model) for name in kinds if name in modes}
    opts = {name: adamw(m) for name, m in copies.items()}
    valuers = {
        name: Valuer(m, {"val": vs}, strategy=args.strategy, autocast_dtype=amp, **kinds[name], **pe)
        for name, m in copies.items()
    }

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        with (
            torch.autocast(args.device.split(":")[0], dtype=amp)
            if amp
            else torch.autocast("cpu", enabled=False)
        ):
            loss = task.per_sequence_loss(model, ids, mask).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def valued(name: str) -> None:
        v, own = valuers[name], opts[name]
        own.zero_grad(set_to_none=True)
        v.forward_backward(ids, mask)
        norm = float(torch.nn.utils.clip_grad_norm_(copies[name].parameters(), 1.0))
        out = v.values(6e-4, grad_scale=min(1.0, 1.0 / (norm + 1e-6)), optimizer=own)
        own.step()
        out = out or v.after_step()
        assert out is not None and out.per_set["val"].shape == (ids.shape[0],)
        assert not args.per_example or out.per_example["val"].shape == (ids.shape[0], len(vs))

    def vmap_grads() -> None:
        """Direct per-sample gradients with torch.func, dotted with the validation gradient.

        The benchmark batches have no padding, so the model is called without an attention mask
        (HF's mask construction has data-dependent branches that vmap cannot trace).
        """
        import torch.nn.functional as F
        from torch.func import functional_call, grad, vmap

        names = [k for k, _ in model.named_parameters()]
        params = {k: p.detach() for k, p in model.named_parameters()}

        def one(p, x):
            logits = functional_call(model, p, (x[None],)).logits[0]
            return F.cross_entropy(logits[:-1].float(), x[1:])

        opt.zero_grad(set_to_none=True)
        loss = task.per_sequence_loss(model, ids, mask).mean()
        loss.backward()
        per = vmap(grad(one), in_dims=(None, 0), randomness="different")(params, ids)
        vl = task.per_sequence_loss(model, vs.ids.to(args.device), vs.mask.to(args.device)).sum()
        gv = torch.autograd.grad(vl, list(model.parameters()))
        _ = sum(per[k].flatten(1) @ g.flatten() for k, g in zip(names, gv, strict=True))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    fns = {
        "plain": plain,
        "order1": lambda: valued("order1"),
        "order2": lambda: valued("order2"),
        "aware": lambda: valued("aware"),
        "vmap": vmap_grads,
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    # first touches of memory the heap had not held, per counted step: a step that follows another
    # mode's larger step can pay them (about 0.8 s for 97k faults in GPT-2-small's plain step), which a
    # run's steady state, one mode repeated, does not; they are printed so that a median can be read
    faults: dict[str, list[int]] = {m: [] for m in modes}
    failed: dict[str, str] = {}
    for rep in range(args.warmup + args.reps):
        for mode in modes:
            if mode in failed:
                continue
            _sync(args.device)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            try:
                fns[mode]()
            except Exception as exc:  # vmap may not support a model; report instead of crashing the run
                failed[mode] = f"{type(exc).__name__}: {str(exc)[:200]}"
                continue
            _sync(args.device)
            if rep >= args.warmup:
                times[mode].append(time.perf_counter() - t0)
                faults[mode].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    if args.profile:
        profile(fns, modes, failed, args)
    if args.plan and "order1" in modes:
        print(valuers["order1"].plans()["val"], file=sys.stderr)
    res = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "batch": ids.shape[0],
        "seq_len": ids.shape[1],
        "val_seqs": len(vs),
        "val_len": vs.ids.shape[1],
        "reps": args.reps,
        "per_example": args.per_example,
        "grad_norms": bool(args.per_example and args.grad_norms),
        "threads": torch.get_num_threads(),
        "median_s": {m: statistics.median(t) for m, t in times.items() if t},
        "ratio": {},
        "minor_page_faults": {m: f for m, f in faults.items() if f},
        "failed": failed,
    }
    for m, t in times.items():
        if m != "plain" and t and times.get("plain"):
            res["ratio"][m] = statistics.median(a / b for a, b in zip(t, times["plain"], strict=False))
    print(
        "| model | batch x T | val seqs x len | mode | median step (s) | ratio vs plain | page faults per step |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for m in modes:
        if m in res["median_s"]:
            r = res["ratio"].get(m, 1.0)
            print(
                f"| {args.model} ({args.dtype}, {args.device}) | {ids.shape[0]} x {ids.shape[1]} | {len(vs)} x "
                f"{vs.ids.shape[1]} | {m} | {res['median_s'][m]:.3f} | {r:.2f}x | "
                f"{', '.join(f'{f:,}' for f in faults[m])} |"
            )
        elif m in failed:
            print(f"| {args.model} | | | {m} | failed: {failed[m]} | |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
