"""Per-component cost floor of one valued step: measured seconds against FLOPs / this machine's GEMM rate.

First the machine's rates: `torch.matmul` on sizes of the shape (tokens x d x 4d, tokens x d x V,
d x tokens x 4d; the best is the GEMM rate) and an elementwise add (the memory bandwidth). Then, in
one process, rounds alternate: a plain step (forward/backward, clip, AdamW) on a copy of the model, a
whole valued step, and each component of a valued step on the valued model: the capturing
forward/backward, each validation set's forward/backward (in the Valuer's chunks of sequences,
`Valuer.pass_chunks`: longest first, each trimmed to its longest), scoring per set, parameter group and
planned strategy (the strategy's validation gradient plus its score, timed per parameter), gradient
norms, the Adam preconditioner and the second-order extra (combining the two sides, and the ghost parameters'
second Gram product; the validation pass at the new weights is the next step's "before" pass, so it
adds none), and the in-run sketch (`attribution.train.sketch`: observing the capture, mixing, adding
to the documents; `--sketch-dim 0` leaves it out), which the whole valued step is charged with, as a run
is. Medians over rounds, after two warm-up rounds that are not counted (`--warmup-rounds`).

FLOPs: scoring from the planner's `estimate_costs` (the same numbers the plan compares); a training
step `6 x dense params x tokens + 12 x layers x T x d x tokens` (attention); a validation pass
`4 x dense params + 12 x layers x T x d` per position its chunks compute (backward to activations
only); norms by the ghost formula per sample. Elementwise work (AdamW, the preconditioner, combining
sides) is bandwidth-bound: its floor adds estimated bytes moved / measured bandwidth. floor = flops / GEMM rate + bytes / bandwidth.
A second floor adds the loss's softmax, one `exp` per logit (tokens x vocabulary) at the measured
`torch.exp` rate, for the plain step, the training pass and the validation passes: the issue's floor
counts GEMM FLOPs only, and at d = 64 the exponentials cost about as much as the head's GEMMs.
Components that the step does not run (the preconditioner unless --optimizer-aware, the order-2 extra
at first order) are timed too and marked "no"; sums use the others only.

    .venv/bin/python benchmarks/cost_floor.py --shape demo --rounds 3
    .venv/bin/python benchmarks/cost_floor.py --shape twelve-text --rounds 3
    .venv/bin/python benchmarks/cost_floor.py --shape gpt2-small-cpu --rounds 2 --json /tmp/floor.json
    python benchmarks/cost_floor.py --shape gpt2-small-cpu --device cuda --sketch-dim 0   # GPU (fp32)

On a GPU every timing synchronizes the device before and after, and the rates are the device's.

Presets: `demo` is the `attribution demo` step (cpu-tiny; its two validation sets `rewrites` and `news`,
8 texts each, approximated as 60 tokens per text, one 64-token sequence; per-example; first order;
gradient norms on). Runs made since the reference set also value 24 held-out documents: add them with
--reference 24. `twelve-text`: cpu-tiny, 12 per-example texts of 205-206 tokens (2,461 in all, cut into
64-token sequences as the loop does: 48 sequences), second order. `gpt2-small-cpu`: 12 layers, d = 768,
batch 16 x 128, 4 per-example texts of 64 tokens.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import GPT2LMHeadModel

from attribution.engine import ValSet, Valuer
from attribution.engine.capture import Captured, join_captures
from attribution.engine.memory import held_bytes, step_memory, use_tensors
from attribution.engine.optimizer import PATH_POINTS, adam_preconditioner
from attribution.engine.planner import estimate_costs
from attribution.engine.scoring import _param, build_val_side, sq_norms
from attribution.engine.strategies import CostInputs, get_strategy
from attribution.engine.strategies.materialize import ByColumn, column_runs
from attribution.engine.task import LanguageModelingTask
from attribution.engine.valuer import column_sq_norms, eval_mode, side_sq_norm
from attribution.train.blocked_head import block_head
from attribution.train.loop import attention_for, gpt2_config

VOCAB = 50257
COMPONENTS = [
    "plain step",
    "train forward/backward (capturing)",
    "validation forward/backward",
    "scoring",
    "gradient norms",
    "Adam preconditioner",
    "order-2 extra",
    "in-run sketch",
]
# elementwise traffic, in float accesses per parameter: AdamW's foreach step (p, g, m, v and temporaries),
# the preconditioner's passes (a few per Gauss-Legendre point), combining two sides (two scalings, one add)
ADAMW_ACCESSES = 16
PRE_ACCESSES = 8 + 32 * PATH_POINTS
PRE_FLOPS = 5 + 16 * PATH_POINTS
COMBINE_ACCESSES = 7

SHAPES: dict[str, dict] = {
    "demo": {
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 2,
        "seq_len": 64,
        "batch": 16,
        "order": 1,
        "sets": {"rewrites": [60] * 8, "news": [60] * 8},
    },
    "twelve-text": {
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 2,
        "seq_len": 64,
        "batch": 16,
        "order": 2,
        "sets": {"texts": [205] * 11 + [206]},
    },
    "gpt2-small-cpu": {
        "n_layer": 12,
        "n_embd": 768,
        "n_head": 12,
        "seq_len": 128,
        "batch": 16,
        "order": 1,
        "sets": {"texts": [64] * 4},
    },
}


@dataclass
class Row:
    """One component: its timings over rounds, FLOPs, elementwise bytes, and whether the step runs it."""

    component: str
    in_step: bool
    flops: float
    bytes_moved: float = 0.0
    exps: float = 0.0  # the softmax's exponentials (one per logit)
    times: list[float] = field(default_factory=list)
    round: int = -1  # the round the last time was added in


DEVICE = torch.device("cpu")  # set by main; a CUDA device makes every timing synchronize


class Padded:
    """The language-modelling loss without its `causal` promise (`--no-trim`): the Valuer then keeps the
    validation sets' trailing padding, as the engine did before `ValSet.trimmed`."""

    def per_sequence_loss(self, model, ids, mask):
        return LanguageModelingTask().per_sequence_loss(model, ids, mask)


def minor_faults() -> int:
    """This process's minor page faults so far: first touches of memory the heap had not held."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t0, out


def _best(fn: Callable[[], object], min_seconds: float) -> float:
    """The fastest of at least 5 runs of `fn` and of as many as fit in `min_seconds`."""
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 5 or spent < min_seconds:
        seconds = timed(fn)[0]
        best, spent, runs = min(best, seconds), spent + seconds, runs + 1
    return best


def gemm_rate(tokens: int, d: int, vocab: int, min_seconds: float = 0.5) -> dict[str, float]:
    """flop/s of `torch.matmul` on sizes this shape multiplies: the best run of each, over at least 5 runs
    and `min_seconds`. Why the time: at d = 64 one product takes 0.2 ms, and the best of 5 read 76 to 179
    GFLOP/s for the same product in two processes (session 19), moving every floor by the same 40%."""
    out = {}
    for m, k, n in ((tokens, d, 4 * d), (tokens, d, vocab), (d, tokens, 4 * d)):
        a, b = torch.randn(m, k, device=DEVICE), torch.randn(k, n, device=DEVICE)
        out[f"{m}x{k}x{n}"] = 2.0 * m * k * n / _best(lambda a=a, b=b: a @ b, min_seconds)
    return out


def exp_rate(min_seconds: float = 0.5) -> float:
    """exp/s of `torch.exp` over 16M floats: the loss's softmax takes one per logit (`engine.task`), work that
    no GEMM does and the FLOP floor leaves out; at d = 64 it is of the order of the head's GEMMs."""
    a, c = torch.randn(1 << 24, device=DEVICE), torch.empty(1 << 24, device=DEVICE)
    return a.numel() / _best(lambda: torch.exp(a, out=c), min_seconds)


def bandwidth() -> float:
    """bytes/s of an elementwise add over 16M floats (two reads, one write)."""
    a, b, c = (torch.randn(1 << 24, device=DEVICE) for _ in range(3))
    best = min(timed(lambda: torch.add(a, b, out=c))[0] for _ in range(5))
    return 3 * a.numel() * 4 / best


def val_set(lengths: list[int], seq_len: int, vocab: int, gen: torch.Generator) -> ValSet:
    """Texts of these token counts cut into `seq_len` sequences, the last one of each padded (mask 0);
    each text one per-example column, as `attribution run` groups a document's sequences."""
    rows, masks, groups = [], [], []
    for text, n_tokens in enumerate(lengths):
        for start in range(0, n_tokens, seq_len):
            real = min(seq_len, n_tokens - start)
            rows.append(torch.randint(0, vocab, (seq_len,), generator=gen))
            masks.append(torch.arange(seq_len) < real)
            groups.append(text)
    return ValSet(torch.stack(rows), torch.stack(masks).long(), groups=groups)


def group_of(name: str, shape: tuple[int, int]) -> str:
    """Parameters scored alike: one row per weight across layers; every 1-D parameter together."""
    if shape[1] == 1:
        return "1-D (biases, LayerNorms)"
    parts = ["*" if p.isdigit() else p for p in name.removeprefix("transformer.").split(".")]
    return ".".join(parts)


def dense_params(valuer: Valuer, train: Captured) -> float:
    """Parameters used as matmul weights (the tied head once; index-only embeddings not at all)."""
    total = 0.0
    for pid, uses in train.uses.items():
        p0, p1 = valuer.shapes[pid]
        total += sum(p0 * p1 for u in uses if not u.row_index and u.col is not None)
    return total


def norm_flops(uses: list, shape: tuple[int, int], n: int, tokens_per_sample: int) -> float:
    """Ghost self-norms: the ghost cost of one sample against itself, times the samples."""
    c = CostInputs(shape, uses, 1, tokens_per_sample, 1, tokens_per_sample, 1)
    return n * get_strategy("ghost").cost(c)[0]


def sketch_flops(projection, train: Captured, names: dict[int, str]) -> float:
    """FLOPs of `InRunSketch.observe` + mixing. Kronecker: per use, both factors projected to the block
    sides (a gathered row costs none) and the small per-sample products. Tensor: per use, both factors'
    count sketches (one add per entry), their real FFTs (2.5 W log2 W each per token), the complex
    products summed over tokens, and one inverse FFT per sample. Both: the `[n, width] x [width, dim]` mix."""
    import math

    flops = 2.0 * train.n * projection.width * projection.dim
    w = projection.width
    fft = 2.5 * w * math.log2(w)
    if projection.kind == "tensor":
        flops += train.n * fft
    for pid, uses in train.uses.items():
        name = names[pid]
        (p0, p1) = projection.params[name]
        for u in uses:
            tokens = u.row.shape[0] * u.row.shape[1]
            if projection.kind == "tensor":
                flops += 0.0 if u.row_index else 2.0 * tokens * p0
                flops += (
                    0.0 if u.col is None else 2.0 * tokens * p1 + tokens * fft + 8.0 * tokens * (w // 2 + 1)
                )
                flops += tokens * fft
                continue
            a, b = projection.blocks[name]
            flops += 0.0 if u.row_index or a == p0 else 2.0 * tokens * p0 * a
            flops += 0.0 if u.col is None or b == p1 else 2.0 * tokens * p1 * b
            flops += 2.0 * tokens * a * b
    return flops


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    for flag in (
        "n-layer",
        "n-embd",
        "n-head",
        "seq-len",
        "batch",
        "val-texts",
        "val-tokens-per-text",
        "order",
        "reference",
    ):
        ap.add_argument(f"--{flag}", type=int, default=None)
    ap.add_argument("--per-example", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--optimizer-aware", action="store_true")
    ap.add_argument(
        "--grad-norms",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the in-run cosine views' per-sample norms (per-example only); default off, as a run with a "
        "checkpoint view (the default) does",
    )
    ap.add_argument(
        "--vocab", type=int, default=VOCAB, help="vocabulary size (tests shrink it; GPT-2's is 50257)"
    )
    ap.add_argument(
        "--sketch-dim", type=int, default=256, help="in-run sketch dimension (0: the step writes none)"
    )
    ap.add_argument("--sketch-kind", default="tensor", choices=["tensor", "kronecker"], help="first stage")
    ap.add_argument(
        "--sketch-side", type=int, default=None, help="the Kronecker sketch's side (default: the run's)"
    )
    ap.add_argument(
        "--sketch-width", type=int, default=None, help="the tensor sketch's width (default: the run's)"
    )
    ap.add_argument(
        "--trim",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="drop the validation sets' trailing padding, as the engine does (--no-trim: as it did before)",
    )
    ap.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="GPT-2's three dropout rates; 0 as `attribution run` trains (train.loop.build_model). 0.1 is "
        "transformers' default, which this benchmark and engine_overhead.py used until session 17",
    )
    ap.add_argument(
        "--attention",
        choices=["run", "sdpa", "eager"],
        default="run",
        help="GPT-2's attention kernel; run: the one `attribution run` uses for this order and device "
        "(train.loop.attention_for: eager at order 2 on the CPU)",
    )
    ap.add_argument(
        "--blocked-head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the head's forward in blocks of vocabulary rows, as a run on the CPU computes it "
        "(train.blocked_head); --no-blocked-head: one GEMM, as before session 17",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--rate-seconds",
        type=float,
        default=0.5,
        help="least time spent measuring each GEMM rate and the exp rate (the best run counts)",
    )
    ap.add_argument(
        "--warmup-rounds",
        type=int,
        default=2,
        help="whole rounds run first and not counted: the heap grows to the rounds' high-water mark in "
        "them (page faults a run's steady state does not pay; their count per step is printed)",
    )
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cuda (fp32 throughout)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    shape = dict(SHAPES[args.shape])
    for key in ("n_layer", "n_embd", "n_head", "seq_len", "batch", "order"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    sets = {k: list(v) for k, v in shape["sets"].items()}
    for name, lengths in sets.items():
        texts = args.val_texts or len(lengths)
        sets[name] = (
            [args.val_tokens_per_text] * texts if args.val_tokens_per_text else (lengths * texts)[:texts]
        )
    if args.reference:
        sets["reference"] = [shape["seq_len"]] * args.reference
    shape["sets"] = sets
    args.shape_spec = shape
    if args.attention == "run":
        args.attention = attention_for(shape["order"], torch.device(args.device).type)
    args.grad_norms = args.grad_norms and args.per_example
    return args


def main(argv: list[str] | None = None) -> dict:
    global DEVICE
    args = parse(argv)
    DEVICE = torch.device(args.device)
    s = args.shape_spec
    torch.manual_seed(0)
    cfg = gpt2_config(
        s["n_layer"],
        s["n_head"],
        s["n_embd"],
        max(1024, s["seq_len"]),
        vocab_size=args.vocab,
        dropout=args.dropout,
        attn_implementation=args.attention,
    )
    model = GPT2LMHeadModel(cfg).to(DEVICE)
    if DEVICE.type == "cpu" and args.blocked_head:
        block_head(model.lm_head)  # as `attribution run` builds it (train.loop.build_model)
    plain_model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    sets = {name: val_set(lengths, s["seq_len"], args.vocab, gen) for name, lengths in s["sets"].items()}
    sets = {
        name: ValSet(vs.ids.to(DEVICE), vs.mask.to(DEVICE), vs.names, groups=vs.groups)
        for name, vs in sets.items()
    }
    per_example = list(sets) if args.per_example else []
    valuer = Valuer(
        model,
        sets,
        order=s["order"],
        per_example=per_example,
        optimizer_aware=args.optimizer_aware,
        grad_norms=args.grad_norms,
        task=LanguageModelingTask() if args.trim else Padded(),
    )
    opts = {
        m: torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        for m in (model, plain_model)
    }
    task = LanguageModelingTask()
    batches = [
        torch.randint(0, args.vocab, (s["batch"], s["seq_len"]), generator=gen).to(DEVICE) for _ in range(2)
    ]
    tokens = s["batch"] * s["seq_len"]
    rates = gemm_rate(tokens, s["n_embd"], args.vocab, args.rate_seconds)
    rate, bw, exps_per_s = max(rates.values()), bandwidth(), exp_rate(args.rate_seconds)

    def plain_step(ids: torch.Tensor) -> None:
        task.per_sequence_loss(plain_model, ids, None).mean().backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 1.0)
        opts[plain_model].step()
        opts[plain_model].zero_grad(set_to_none=True)

    def clip() -> float:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        return float(torch.clamp(1.0 / (norm + 1e-6), max=1.0))

    def valued_step(ids: torch.Tensor) -> None:
        valuer.forward_backward(ids)
        aware = opts[model] if args.optimizer_aware else None
        out = valuer.values(1e-4, grad_scale=clip(), optimizer=aware)
        opts[model].step()
        out = out or valuer.after_step()
        assert out is not None
        opts[model].zero_grad(set_to_none=True)

    sketch = None
    if args.sketch_dim:
        from attribution.train.sketch import InRunSketch

        n_docs = s["batch"]
        sketch = InRunSketch(
            model,
            args.sketch_dim,
            0,
            [(0, 10**9)],
            np.arange(n_docs),
            [str(i) for i in range(n_docs)],
            side=args.sketch_side,
            kind=args.sketch_kind,
            width=args.sketch_width,
        )

    def sketch_step(train: Captured) -> None:
        sketch.observe(train, 1e-4)
        sketch.add(1, np.arange(train.n))

    plain_step(batches[1])  # warm-up: plans, allocations, optimizer state
    valued_step(batches[1])
    rows: dict[str, Row] = {}

    def add(
        key: str, in_step: bool, flops: float, seconds: float, bytes_moved: float = 0.0, exps: float = 0.0
    ) -> None:
        """This round's time of one component; a row shared by several parameters (one per layer) is the
        sum of their times and FLOPs in the round, so rows add up to the step."""
        row = rows.setdefault(key, Row(key, in_step, 0.0, 0.0))
        if row.round == r:
            row.times[-1] += seconds
            row.flops, row.bytes_moved = row.flops + flops, row.bytes_moved + bytes_moved
            row.exps += exps
            return
        row.round = r
        row.flops, row.bytes_moved, row.exps = flops, bytes_moved, exps  # the same every round
        row.times.append(seconds)

    whole: dict[str, list[float]] = {"plain": [], "valued": []}
    faults: dict[str, list[int]] = {"plain": [], "valued": []}
    n_params = sum(p.numel() for p in model.parameters())
    mem = measured = None
    for r in range(args.warmup_rounds + args.rounds):
        ids = batches[r % len(batches)]
        for key, step in (("plain", plain_step), ("valued", valued_step)):
            before = minor_faults()
            whole[key].append(timed(lambda ids=ids, step=step: step(ids))[0])
            faults[key].append(minor_faults() - before)
        # the components, on the valued model's state; no optimizer step here, so its weights stay put
        t_fb = timed(lambda ids=ids: valuer.forward_backward(ids))[0] + timed(clip)[0]
        train, plans = valuer._train, valuer.plans()
        dense = dense_params(valuer, train)
        step_flops = 6 * dense * tokens + 12 * s["n_layer"] * s["seq_len"] * s["n_embd"] * tokens
        add(
            "plain step (fwd/bwd + clip + AdamW)",
            True,
            step_flops,
            whole["plain"][-1],
            ADAMW_ACCESSES * 4 * n_params,
            exps=tokens * args.vocab,
        )
        add("train forward/backward (capturing) + clip", True, step_flops, t_fb, exps=tokens * args.vocab)
        if sketch is not None:
            add(
                f"in-run sketch, dim {args.sketch_dim} {sketch.projection.kind} width {sketch.projection.width} "
                "(observe + mix + accumulate)",
                True,
                sketch_flops(sketch.projection, train, sketch.names),
                timed(lambda train=train: sketch_step(train))[0],
            )
        t_norms = 0.0
        if args.grad_norms:
            t_norms += timed(lambda train=train, plans=plans: sq_norms(train, plans[next(iter(plans))]))[0]
        n_flops = sum(
            norm_flops(u, valuer.shapes[pid], train.n, s["seq_len"]) for pid, u in train.uses.items()
        )
        t_o2, o2_flops, o2_bytes, pre = 0.0, 0.0, 0.0, None
        params = {pid: p for pid, (_, p) in valuer.capturer.params.items()}
        t_pre, pre = timed(
            lambda params=params, n=train.n: adam_preconditioner(opts[model], params, batch_size=n)
        )
        pre_bytes = PRE_ACCESSES * 4 * n_params
        for name, vs in valuer.val_sets.items():  # as the Valuer holds them: trailing padding trimmed
            plan, pe = plans[name], name in per_example
            t_val, cap, taken, val_flops, val_tokens = 0.0, None, [], 0.0, 0
            for seqs, ids, mask in valuer.pass_chunks(name):  # the Valuer's chunks, in its order
                with eval_mode(valuer.inner), torch.enable_grad():
                    t, part = timed(
                        lambda ids=ids, mask=mask: valuer.capturer.grads_only(
                            lambda: task.per_sequence_loss(valuer.inner, ids, mask)
                        )
                    )
                t_val += t
                # untimed: the scoring below takes the set's capture whole
                cap = part if cap is None else join_captures(cap, part)
                taken.append(seqs)
                positions = ids.numel()  # the chunk's, padding to its longest sequence included
                val_tokens += positions
                val_flops += (
                    4 * dense * positions + 12 * s["n_layer"] * ids.shape[1] * s["n_embd"] * positions
                )
            add(
                f"validation forward/backward [{name}]",
                True,
                val_flops,
                t_val,
                exps=val_tokens * args.vocab,
            )
            order = torch.cat(taken)
            columns = vs.groups.to(DEVICE)[order] if pe and vs.groups is not None else None
            # per example, the Valuer adds each sequence's gradient into its example's row (ByColumn)
            index = (columns if columns is not None else order) if pe else None

            def into(pid: int, shape, dtype, rows=vs.n_columns) -> torch.Tensor:
                return torch.zeros(rows, *shape, dtype=dtype, device=DEVICE)

            side = build_val_side(cap, plan, valuer.shapes, pe, index, into)  # a buffer per parameter
            if pe:
                side = dataclasses.replace(side, columns=index, n_columns=vs.n_columns)

            runs = column_runs(index) if index is not None else []

            def val_gradient(f, uses, param, pe=pe, index=index, runs=runs) -> torch.Tensor:
                if index is None:
                    return f(uses, param, pe)
                return f(uses, param, pe, ByColumn(index, functools.partial(into, param.pid), runs))

            sz = plan.sizes
            for pid, uses in train.uses.items():
                lp = plan.layers[pid]
                strat = get_strategy(lp.strategy)
                param = _param(pid, uses, plan, valuer.shapes)
                t = 0.0
                if strat.val_gradient is not None:
                    t += timed(
                        lambda f=strat.val_gradient, u=cap.uses[pid], param=param: val_gradient(f, u, param)
                    )[0]
                t_score = timed(
                    lambda f=strat.score, uses=uses, side=side, param=param: f(uses, side, param)
                )[0]
                est = estimate_costs(
                    lp.shape, uses, sz["n"], sz["train_tokens"], sz["m"], sz["val_tokens"], sz["groups"]
                )
                flops = est[lp.strategy][0] if lp.strategy in est else 0.0
                add(
                    f"scoring [{name}] {group_of(lp.name, lp.shape)} ({lp.strategy})",
                    True,
                    flops,
                    t + t_score,
                )
                if strat.val_gradient is None:  # order 2 scores ghost parameters against both captures
                    t_o2, o2_flops = t_o2 + t_score, o2_flops + flops
            if args.grad_norms:
                t_norms += timed(lambda side=side: side_sq_norm(side, valuer.shapes))[0]
                n_flops += sum(2.0 * g.numel() for g in side.dense.values())
                if pe:  # each column's norm: dense rows directly, ghost factors by their self-product
                    t_norms += timed(lambda side=side: column_sq_norms(side))[0]
                    n_flops += sum(2.0 * g.numel() for g in side.dense.values())
                    n_flops += sum(
                        norm_flops(u, valuer.shapes[pid], cap.n, vs.ids.shape[1])
                        for c, _ in side.ghost
                        for pid, u in c.uses.items()
                    )
            t_o2 += timed(lambda side=side: side.combine(side, 0.5, 0.5))[0]
            elements = sum(g.numel() for g in side.dense.values())
            o2_flops, o2_bytes = o2_flops + 3.0 * elements, o2_bytes + COMBINE_ACCESSES * 4 * elements
            if pre is not None:
                dense_side = dataclasses.replace(side, ghost=[])  # ghost sides take none
                t_pre += timed(lambda side=dense_side, pre=pre: side.precondition(pre))[0]
                pre_bytes += 3 * 4 * elements
        add("gradient norms", args.grad_norms, max(n_flops, 1.0), max(t_norms, 1e-9))
        add(
            "Adam preconditioner (+ preconditioning the sides)",
            args.optimizer_aware,
            PRE_FLOPS * n_params,
            t_pre,
            pre_bytes,
        )
        add(
            "order-2 extra (combine sides + 2nd ghost scoring)",
            s["order"] == 2,
            max(o2_flops, 1.0),
            t_o2,
            o2_bytes,
        )
        if mem is None:
            mem = step_memory(
                plans,
                order=s["order"],
                optimizer_aware=args.optimizer_aware,
                grad_norms=args.grad_norms,
                per_example=per_example,
            )
            measured = {"train captures": held_bytes(use_tensors(train.uses))}
        valuer._train = None  # the next round's valued step starts afresh
    for times in [row.times for row in rows.values()] + list(whole.values()) + list(faults.values()):
        del times[: args.warmup_rounds]
    return report(args, s, rows, whole, faults, rates, (rate, bw, exps_per_s), mem, measured, valuer)


def report(args, s, rows, whole, faults, rates, speeds, mem, measured, valuer) -> dict:
    rate, bw, exps_per_s = speeds
    out_rows = []
    for row in rows.values():
        sec = statistics.median(row.times)
        floor = row.flops / rate + row.bytes_moved / bw
        softmax = floor + row.exps / exps_per_s
        out_rows.append(
            {
                "component": row.component,
                "in_step": row.in_step,
                "seconds": sec,
                "flops": row.flops,
                "bytes_moved": row.bytes_moved,
                "floor_s": floor,
                "measured_over_floor": sec / floor,
                "exps": row.exps,
                "floor_with_softmax_s": softmax,
                "measured_over_floor_with_softmax": sec / softmax,
            }
        )
    plain, valued = statistics.median(whole["plain"]), statistics.median(whole["valued"])
    sketch_s = sum(r["seconds"] for r in out_rows if r["component"].startswith("in-run sketch"))
    valued += sketch_s  # the valued step of a run: the sketch observes every step's capture
    plain_row = next(r for r in out_rows if r["component"].startswith("plain"))
    plain_floor, plain_softmax = plain_row["floor_s"], plain_row["floor_with_softmax_s"]
    adds = [  # what valuation adds (the capturing pass replaces the plain one)
        r for r in out_rows if r["in_step"] and not r["component"].startswith(("plain", "train"))
    ]
    floors = sum(r["floor_s"] for r in adds)
    floors_softmax = sum(r["floor_with_softmax_s"] for r in adds)
    res = {
        "shape": {k: v for k, v in s.items() if k != "sets"}
        | {
            "val_sets": {
                k: {"texts": len(v), "tokens": sum(v), "sequences": len(valuer.val_sets[k])}
                for k, v in s["sets"].items()
            },
            "per_example": args.per_example,
            "optimizer_aware": args.optimizer_aware,
            "trim": args.trim,
            "grad_norms": args.grad_norms,
            "dropout": args.dropout,
            "attention": args.attention,
            "blocked_head": args.blocked_head,
        },
        "rounds": args.rounds,
        "warmup_rounds": args.warmup_rounds,
        "minor_page_faults": faults,
        "threads": torch.get_num_threads(),
        "gemm_flops_per_s_by_size": rates,
        "gemm_flops_per_s": rate,
        "bandwidth_bytes_per_s": bw,
        "exp_per_s": exps_per_s,
        "components": out_rows,
        "plain_s": plain,
        "valued_s": valued,
        "valued_over_plain": valued / plain,
        "sketch_s": sketch_s,
        "sketch_share_of_valued_step": sketch_s / valued,
        "valuation_floors_s": floors,
        "sum_of_floors_s": plain_floor + floors,
        "valued_over_sum_of_floors": valued / (plain_floor + floors),
        "sum_of_floors_with_softmax_s": plain_softmax + floors_softmax,
        "valued_over_sum_of_floors_with_softmax": valued / (plain_softmax + floors_softmax),
        # what arithmetic allows the valued-over-plain ratio: both steps at their floors
        "ratio_floor": (plain_floor + floors) / plain_floor,
        "plans": {k: p.counts() for k, p in valuer.plans().items()},
        "memory": {
            "total": mem.total,
            "by_what": mem.by_what(),
            "measured": measured,
            "terms": [t.__dict__ for t in mem.terms],
        },
    }
    res["device"] = str(DEVICE) if DEVICE.type == "cpu" else torch.cuda.get_device_name(DEVICE)
    print(f"shape {args.shape} on {res['device']}: {json.dumps(res['shape'])}")
    print(
        f"GEMM rate {rate / 1e9:.1f} GFLOP/s (best of {', '.join(f'{k}: {v / 1e9:.1f}' for k, v in rates.items())}); "
        f"bandwidth {bw / 1e9:.1f} GB/s; exp {exps_per_s / 1e9:.2f} G/s; {res['threads']} threads; "
        f"plans {json.dumps(res['plans'])}\n"
    )
    print(
        "| component | in step | seconds (median) | GFLOP | est. bytes moved | floor (s) | measured / floor "
        "| + softmax exps (s) | measured / that |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in out_rows:
        print(
            f"| {r['component']} | {'yes' if r['in_step'] else 'no'} | {r['seconds']:.4f} | {r['flops'] / 1e9:.3f} | "
            f"{r['bytes_moved']:,.0f} | {r['floor_s']:.5f} | {r['measured_over_floor']:.1f}x | "
            f"{r['floor_with_softmax_s']:.5f} | {r['measured_over_floor_with_softmax']:.1f}x |"
        )
    print(
        f"| whole valued step ({valued / plain:.2f}x the plain step) | | {valued:.4f} | | | "
        f"{plain_floor + floors:.5f} (sum) | {res['valued_over_sum_of_floors']:.2f}x | "
        f"{plain_softmax + floors_softmax:.5f} (sum) | {res['valued_over_sum_of_floors_with_softmax']:.2f}x |"
    )
    print(
        f"\nminor page faults per whole step, by round: plain {faults['plain']}, valued {faults['valued']} "
        f"(after {args.warmup_rounds} warm-up round(s))"
    )
    if sketch_s:
        print(
            f"\nthe in-run sketch is {100 * sketch_s / valued:.1f}% of the valued step ({sketch_s:.4f} s of {valued:.4f} s)"
        )
    print(
        f"\nvaluation adds {valued - plain:.4f} s to the plain step's {plain:.4f} s; its floors add {floors:.5f} s "
        f"(the ratio at the floors: {res['ratio_floor']:.3f}x, measured {valued / plain:.3f}x)"
    )
    print(
        f"\nmemory held by the valued step (model; measured train captures {measured['train captures']:,} bytes):\n"
    )
    print(mem)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
