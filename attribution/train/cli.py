"""`attribution run` (train and value) and `attribution demo` (the whole pipeline on the built-in corpus)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from attribution.errors import UserError
from attribution.train.presets import preset_names


def _parse_val(values: tuple[str, ...]) -> dict[str, str] | None:
    out: dict[str, str] = {}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--val expects NAME=PATH, got {item!r}")
        if name in out:
            raise UserError(f"validation set {name!r} given twice")
        out[name] = path
    return out or None


def _read_ids(path: str | None) -> tuple[str, ...] | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file (--exclude-ids expects a file with one document id per line)")
    return tuple(line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip())


@click.command("run")
@click.option(
    "--corpus",
    multiple=True,
    help="Corpus path (JSONL/.jsonl.zst shard or folder, CSV, Parquet, "
    "text folder), `builtin[:N_DOCS[:SEED]]`, or hf:NAME[:split]. Repeat for several.",
)
@click.option(
    "--val",
    "val",
    multiple=True,
    metavar="NAME=PATH",
    help="A validation set: JSONL with {id, text, meta}. Valued as a whole, and per example when it has "
    "at most --per-example-max documents. Repeat for several. Never trained on.",
)
@click.option("--out", type=click.Path(file_okay=False), help="Run directory to write.")
@click.option(
    "--preset",
    type=click.Choice(preset_names()),
    default=None,
    help="Model and optimizer settings: cpu-tiny (demo on 2 CPU cores), gpt2-small (the paper's 124M "
    "GPT-2, T=1024, AdamW 6e-4 -> 6e-5), test-micro (seconds).",
)
@click.option("--steps", type=int, default=None, help="Optimizer steps (default: the preset's).")
@click.option(
    "--epochs", type=float, default=None, help="Passes over the training sequences instead of --steps."
)
@click.option(
    "--order",
    type=click.IntRange(1, 2),
    default=None,
    help="1: first-order values; 2: second order (trapezoid along each step).",
)
@click.option(
    "--optimizer",
    type=click.Choice(["adamw", "sgd"]),
    default=None,
    help="Training optimizer (default adamw). Under AdamW values are Adam-preconditioned unless --sgd-proxy.",
)
@click.option(
    "--optimizer-aware/--sgd-proxy",
    "optimizer_aware",
    default=None,
    help="Value AdamW steps with Adam's preconditioner, the step actually taken (default), or with the "
    "SGD formula as a proxy, as the paper does (cheaper: the head can use ghost products).",
)
@click.option(
    "--seed", type=int, default=None, help="Seed for init and batch order (same seed, same values)."
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default=None,
    help="auto = cuda with bfloat16 when a GPU is present, else cpu.",
)
@click.option(
    "--resume", is_flag=True, default=None, help="Continue the run in --out from its last checkpoint."
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="TOML file with any of these settings (flags win over it).",
)
@click.option(
    "--exclude-ids",
    type=click.Path(dir_okay=False),
    help="File of document ids (one a line) kept out of training.",
)
@click.option(
    "--steps-per-checkpoint",
    "checkpoint_every",
    type=int,
    default=None,
    help="Checkpoint every K steps (and at the end).",
)
@click.option(
    "--keep-every",
    type=int,
    default=None,
    help="Replay chain: keep a checkpoint at step 0 and every K steps (default: the preset's; cpu-tiny 20). "
    "`attribution claim` replays from them; 0 keeps none (the run cannot answer claims).",
)
@click.option(
    "--reference",
    type=int,
    default=None,
    help="Documents held out of training as the fixed reference set of the contrast views (default: the "
    "preset's; cpu-tiny 16); 0 = none (views then fall back to the other validation texts).",
)
@click.option(
    "--reference-texts",
    "reference_texts",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Texts (JSONL/CSV/TXT, as --val) added to the reference set, each valued whole and never trained "
    "on: text in the register of the texts you will attribute (e.g. news reports, if the claims are news) "
    "but derived from no training document, so that a document stands out for a text only when it "
    "relates to *that* text, not to its register. Repeatable.",
)
@click.option(
    "--per-example-max",
    type=int,
    default=None,
    help="Per-example values for validation sets with at most this many documents (default 64).",
)
@click.option(
    "--no-values",
    "plain",
    is_flag=True,
    default=False,
    help="Train without valuation (a throughput baseline); writes logs and checkpoints only.",
)
@click.option(
    "--sketch-dim",
    type=click.IntRange(min=1),
    default=None,
    help="Dimension of the in-run gradient sketch index (sketch/index.faiss) that `attribution claim "
    "--fast` searches (default 512: 1 KiB per document, float16; docs/benchmarks.md, 'Sketch fidelity').",
)
@click.option(
    "--sketch-kind",
    type=click.Choice(["tensor", "kronecker"]),
    default=None,
    help="First stage of the sketch: 'tensor' (default: one tensor sketch of the whole gradient, "
    "--sketch-width numbers) or 'kronecker' (per-parameter Gaussian blocks, --sketch-side: about a "
    "quarter of the in-run cost, and the runs before session 9; docs/benchmarks.md, 'Session 9').",
)
@click.option(
    "--sketch-mix",
    type=click.Choice(["shared", "segment"]),
    default=None,
    help="'shared' (default): one random mix for every replay segment, so a claim meets each "
    "document's whole training; 'segment': one mix per segment (unbiased per segment, noisier).",
)
@click.option(
    "--sketch-width",
    type=click.IntRange(min=1),
    default=None,
    help="With --sketch-kind tensor: width of its first stage (default 2048); its error is about that of "
    "a projection to this many numbers.",
)
@click.option(
    "--sketch-side",
    type=click.IntRange(min=1),
    default=None,
    help="With --sketch-kind kronecker: a weight's rows and columns are projected to at most this many "
    "(default 32).",
)
@click.option(
    "--no-sketch",
    "no_sketch",
    is_flag=True,
    default=False,
    help="Write no gradient sketch index (claims then need the exact replay).",
)
@click.option(
    "--no-checkpoint-view",
    "no_checkpoint_view",
    is_flag=True,
    default=False,
    help="Skip the exact gradient similarity at the kept checkpoints after training (one gradient pass over "
    "the trained documents per kept checkpoint); the default view is then the in-run standout_cosine.",
)
@click.option(
    "--in-run-cosine/--no-in-run-cosine",
    "in_run_cosine",
    default=None,
    help="Compute per-sample gradient norms in every valued step, for the in-run cosine views (cosine, "
    "contrast_cosine, standout_cosine). Default: only when the run has no checkpoint view, since the "
    "default view reads the checkpoint cosines; they add about 7% to a valued GPT-2-small step.",
)
@click.option("--batch-size", type=int, default=None, help="Sequences per step (overrides the preset).")
@click.option("--seq-len", type=int, default=None, help="Tokens per sequence (overrides the preset).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (overrides the preset).")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Token cache (default $ATTRIBUTION_CACHE/tokens or ~/.cache/attribution/tokens).",
)
def run_command(
    corpus,
    val,
    out,
    preset,
    steps,
    epochs,
    order,
    optimizer,
    optimizer_aware,
    seed,
    device,
    resume,
    config_path,
    exclude_ids,
    checkpoint_every,
    keep_every,
    reference,
    reference_texts,
    per_example_max,
    plain,
    sketch_dim,
    sketch_kind,
    sketch_mix,
    sketch_width,
    sketch_side,
    no_sketch,
    no_checkpoint_view,
    in_run_cosine,
    batch_size,
    seq_len,
    lr,
    cache_dir,
) -> None:
    """Train GPT-2 from scratch on a corpus and value every document against validation sets.

    \b
    Writes into --out: doc_values.parquet, example_values.parquet, stage_values.parquet,
    step_values.parquet, docs.parquet, train_log.csv, manifest.json, val_sets/, checkpoints/, and
    replay/ (the kept checkpoints `attribution claim` replays when a text arrives after training).
    Example:
      attribution run --corpus builtin --val rewrites=val.jsonl --out runs/x --preset cpu-tiny
    Several processes:  torchrun --nproc_per_node 2 -m attribution.cli run ...
    """
    from attribution.train.config import build_config

    flags: dict[str, Any] = {
        "corpus": list(corpus) or None,
        "val": _parse_val(val),
        "out": out,
        "preset": preset,
        "steps": steps,
        "epochs": epochs,
        "order": order,
        "optimizer": optimizer,
        "optimizer_aware": optimizer_aware,
        "seed": seed,
        "device": device,
        "resume": resume,
        "exclude_ids": _read_ids(exclude_ids),
        "checkpoint_every": checkpoint_every,
        "keep_every": keep_every,
        "reference": reference,
        "reference_texts": list(reference_texts) or None,
        "per_example_max": per_example_max,
        "value": False if plain else None,
        "sketch": False if no_sketch else None,
        "checkpoint_view": False if no_checkpoint_view else None,
        "in_run_cosine": in_run_cosine,
        "sketch_dim": sketch_dim,
        "sketch_kind": sketch_kind,
        "sketch_mix": sketch_mix,
        "sketch_width": sketch_width,
        "sketch_side": sketch_side,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lr": lr,
        "cache_dir": cache_dir,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    from attribution.train.config import load_toml

    if out is None and "out" not in (load_toml(config_path) if config_path else {}):
        raise UserError("give --out DIR (or `out` in the --config file)")
    cfg = build_config(config_path, **given)
    from attribution.train.loop import train_and_value

    sources = {
        "flags": sorted(given),
        "config_file": str(config_path) if config_path else None,
        "argv": sys.argv[1:],
    }
    run_dir = train_and_value(cfg, sources=sources)
    click.echo(f"run written to {run_dir}", err=True)


@click.command("demo")
@click.option(
    "--out", type=click.Path(file_okay=False), default="runs/demo", show_default=True, help="Run directory."
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False),
    default="reports/demo",
    show_default=True,
    help="Where the report goes.",
)
@click.option("--steps", type=int, default=None, help="Training steps (default: the cpu-tiny preset's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted demo run.")
def demo_command(out, report_dir, steps, seed, resume) -> None:
    """The whole pipeline on the built-in corpus, in a few minutes on a laptop CPU.

    \b
    1. builds the built-in multi-source corpus (cached);
    2. makes two validation sets: `rewrites` (paraphrases and partial copies of a few training
       documents) and a per-domain set (held-out documents of one source, kept out of training);
    3. trains the cpu-tiny GPT-2 with AdamW, valuing every document against both sets;
    4. builds the report (HTML and Markdown) and prints where everything is.
    """
    from attribution.workflows.demo import run_demo

    t0 = time.perf_counter()
    paths = run_demo(Path(out), Path(report_dir), steps=steps, seed=seed, resume=resume)
    click.echo(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    click.echo(f"demo finished in {time.perf_counter() - t0:.0f} s", err=True)


commands = [run_command, demo_command]
