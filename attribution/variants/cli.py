"""`attribution variants` and `attribution experiment copyright`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from attribution.errors import UserError
from attribution.io import atomic_write

REWRITER_HELP = (
    "Who writes paraphrase/significant variants: 'offline' (default; thesaurus-based, no model), "
    'cmd:"COMMAND" (original on stdin, rewrite on stdout; $ATTRIBUTION_REWRITE_KIND says which kind) or '
    "http:URL (an OpenAI-compatible chat endpoint; key from --rewriter-key-env)."
)


def rewriter_options(f):
    """The plug-in rewriter's flags, shared by `variants` and `experiment copyright`."""
    opts = [
        click.option("--rewriter", default="offline", show_default=True, help=REWRITER_HELP),
        click.option(
            "--rewriter-model",
            default="gpt-4o-mini",
            show_default=True,
            help="Model name sent to an http: rewriter.",
        ),
        click.option(
            "--rewriter-key-env",
            default="OPENAI_API_KEY",
            show_default=True,
            help="Environment variable holding the http: rewriter's API key (unset: no key sent).",
        ),
        click.option(
            "--rewriter-timeout",
            type=click.FloatRange(min=0.1),
            default=120.0,
            show_default=True,
            help="Seconds one rewrite may take before it counts as failed.",
        ),
        click.option(
            "--rewriter-retries",
            type=click.IntRange(min=0),
            default=2,
            show_default=True,
            help="Extra attempts after a failed or empty rewrite.",
        ),
        click.option(
            "--on-rewriter-failure",
            type=click.Choice(["error", "fallback"]),
            default="error",
            show_default=True,
            help="When a plug-in rewriter fails: stop with an error, or use the offline rewriter "
            "(recorded in each record's meta.fallback_reason).",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def make_rewriter_from(kw: dict):
    from attribution.variants.rewriters import make_rewriter

    return make_rewriter(
        kw["rewriter"],
        timeout=kw["rewriter_timeout"],
        retries=kw["rewriter_retries"],
        on_failure=kw["on_rewriter_failure"],
        model=kw["rewriter_model"],
        key_env=kw["rewriter_key_env"],
    )


def format_summary(rows: list[dict]) -> str:
    lines = [
        f"{'variant':<12} {'n':>3}  {'8-gram containment':>20}  {'3-gram Jaccard':>16}  {'MiniLM cosine':>15}",
        f"{'':<12} {'':>3}  {'median [p10, p90]':>20}  {'median':>16}  {'median [p10]':>15}",
    ]
    for r in rows:
        lines.append(
            f"{r['variant']:<12} {r['n']:>3}  "
            f"{r['containment_8_median']:>6.3f} [{r['containment_8_p10']:.3f}, {r['containment_8_p90']:.3f}]  "
            f"{r['jaccard_3_median']:>16.3f}  {r['cosine_minilm_median']:>6.3f} [{r['cosine_minilm_p10']:.3f}]"
        )
    return "\n".join(lines)


@click.command("variants")
@click.option(
    "--corpus",
    "corpus",
    multiple=True,
    required=True,
    help="Training corpus the originals come from (path, 'builtin', ...); repeatable.",
)
@click.option("--pick", type=int, default=None, help="Pick N prose documents of moderate length (seeded).")
@click.option(
    "--ids", default=None, help="Comma-separated document ids to use as originals instead of --pick."
)
@click.option(
    "--kinds",
    default="exact,partial,paraphrase,significant,similar",
    show_default=True,
    help="Which variants to write, comma-separated.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Validation JSONL to write; the held-out similar-topic pool goes to OUT.heldout.txt.",
)
@click.option(
    "--pool-fraction",
    type=float,
    default=0.1,
    show_default=True,
    help="Share of the other documents held out as the similar-topic pool. Keep them out of "
    "training: `attribution run --exclude-ids OUT.heldout.txt`.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed for picking, excerpts and rewrites."
)
@rewriter_options
def variants_cmd(corpus, pick, ids, kinds, out, pool_fraction, seed, **kw) -> None:
    """Write validation documents made from chosen training documents.

    \b
    exact        a verbatim copy
    partial      an excerpt (>= half) framed as the answer to a new instruction
    paraphrase   a meaning-preserving rewrite, sentence by sentence
    significant  a heavy rewrite: condensed, reordered, reworded
    similar      a different real document on a related subject, from a held-out pool

    Each line is {"id", "text", "meta": {"variant", "target_id", containment_8, jaccard_3,
    cosine_minilm, ...}} so you can see how far each variant is from its original.
    """
    from tqdm import tqdm

    from attribution.variants.build import (
        build_variants,
        distance_summary,
        load_docs,
        parse_kinds,
        pick_targets,
        select_ids,
        split_pool,
        write_jsonl,
    )

    kind_list = parse_kinds(kinds)
    if (pick is None) == (ids is None):
        raise UserError("give exactly one of --pick N or --ids ID,...")
    docs = load_docs(corpus)
    targets = (
        select_ids(docs, [i.strip() for i in ids.split(",") if i.strip()])
        if ids
        else pick_targets(docs, pick, seed)
    )
    pool = split_pool(docs, targets, pool_fraction, seed) if "similar" in kind_list else []
    rewriter = make_rewriter_from(kw)
    with tqdm(total=len(targets), desc="variants", unit=" docs", file=sys.stderr, disable=None) as bar:
        records = build_variants(
            targets, kind_list, rewriter=rewriter, pool=pool, seed=seed, progress=bar.update
        )
    write_jsonl(out, records)
    if pool:
        with atomic_write(Path(f"{out}.heldout.txt")) as fh:
            fh.write("".join(f"{d.doc_id}\n" for d in pool))
    click.echo(f"wrote {len(records)} validation documents for {len(targets)} originals to {out}")
    if pool:
        click.echo(f"held-out similar-topic pool ({len(pool)} ids, keep out of training): {out}.heldout.txt")
    click.echo(format_summary(distance_summary(records)))


@click.group("experiment")
def experiment() -> None:
    """End-to-end experiments that reproduce the paper's findings on your corpus."""


@experiment.command("copyright")
@click.option(
    "--corpus",
    "corpus",
    multiple=True,
    default=("builtin:200",),
    show_default=True,
    help="Training corpus; repeatable. Default: a 200-document built-in corpus (about 15 minutes for both "
    "orders on 2 CPU cores). Every step values all variants, so on a CPU keep the corpus and --pick "
    "small (see docs/benchmarks.md).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for variants, runs, table.csv, table.md and rank plot.",
)
@click.option("--pick", type=int, default=None, help="Number of originals to pick.  [default: 8]")
@click.option(
    "--ids", default=None, help="Comma-separated document ids to use as originals instead of --pick."
)
@click.option(
    "--originals",
    "originals",
    multiple=True,
    metavar="FILE",
    help="Hand-written originals ({text, meta: {id, pile_set_name, ...}} a line, e.g. "
    "corpora/handwritten/originals_a.jsonl), added to the training corpus after --corpus; repeatable. "
    "Needs --variants; replaces --pick/--ids.",
)
@click.option(
    "--variants",
    "variants",
    multiple=True,
    metavar="FILE",
    help="Hand-written variants ({id, text, meta: {variant, target_id}} a line, each target one of "
    "--originals), valued as given: nothing is generated and no similar-topic pool is held out; "
    "repeatable. Needs --originals.",
)
@click.option(
    "--kinds",
    default="partial,paraphrase,significant,similar",
    show_default=True,
    help="Variant kinds to value ('exact' cannot be: a training document identical to a "
    "validation text is kept out of training). With --variants: which of the given ones.",
)
@click.option(
    "--preset", default="cpu-tiny", show_default=True, help="Training preset (see `attribution run`)."
)
@click.option(
    "--steps",
    type=int,
    default=None,
    help="Training steps. Default: one epoch (--epochs 1), so every original is trained on.",
)
@click.option(
    "--epochs", type=float, default=1.0, show_default=True, help="Passes over the corpus when no --steps."
)
@click.option(
    "--reference",
    type=int,
    default=None,
    help="Corpus documents held out as the run's fixed reference set of the standout and contrast "
    "views (default: the preset's; cpu-tiny 16). They are taken from --corpus, never from --originals, "
    "so a larger reference leaves fewer corpus documents in training.",
)
@click.option(
    "--reference-texts",
    "reference_texts",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Texts added to the run's reference set, valued whole and never trained on (`attribution run "
    "--reference-texts`): text in the variants' register that no original gave rise to. For the "
    "hand-written cases: corpora/handwritten/reference.jsonl and reference2.jsonl, both (docs/benchmarks.md, "
    '"Session 17"). Repeatable.',
)
@click.option(
    "--max-words",
    type=int,
    default=150,
    show_default=True,
    help="Longest original --pick may choose (validation cost grows with length).",
)
@click.option(
    "--batch-size",
    type=int,
    default=32,
    show_default=True,
    help="Sequences per training step; larger = fewer valued steps (each step values every variant). "
    "0 = the preset's.",
)
@click.option(
    "--orders",
    default="1,2",
    show_default=True,
    help="Which In-Run Shapley orders to run (one training run each).",
)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option(
    "--optimizer-aware/--sgd-proxy",
    default=True,
    show_default=True,
    help="Value AdamW steps through Adam's preconditioner (closer to the step really taken) "
    "or with the plain SGD gradient dot product.",
)
@click.option(
    "--pool-corpus",
    multiple=True,
    help="Corpus to find 'similar' documents in (repeatable); its documents that are in the training "
    "corpus are dropped, the rest are never trained on. Default: the full 3000-document built-in "
    "corpus when --corpus is built-in, else a --pool-fraction share of --corpus held out of training.",
)
@click.option(
    "--pool-fraction",
    type=float,
    default=0.1,
    show_default=True,
    help="Share of the corpus held out of training as the similar-topic pool (when no --pool-corpus).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", type=int, default=0, show_default=True)
@rewriter_options
def copyright_cmd(
    corpus,
    out,
    pick,
    ids,
    originals,
    variants,
    kinds,
    preset,
    steps,
    epochs,
    reference,
    reference_texts,
    max_words,
    batch_size,
    orders,
    optimizer,
    optimizer_aware,
    pool_corpus,
    pool_fraction,
    device,
    seed,
    **kw,
) -> None:
    """Rank each variant's original among all training documents, by In-Run Shapley and baselines.

    \b
    Picks originals, builds their variants, keeps the variants and the similar-topic pool out of
    training, trains and values (first and second order), then writes OUT/table.csv, OUT/table.md
    and OUT/ranks.png: per variant kind, the average rank of the original under In-Run Shapley
    (1st, 2nd order), BM25, MiniLM similarity and 8-gram containment, next to the variants'
    distances. Rank 1 = the original is the top contributor. OUT/ranks.csv has one row per variant.
    Hand-written cases instead of picked and generated ones:
      attribution experiment copyright --out runs/hw \\
        --originals corpora/handwritten/originals_a.jsonl --originals corpora/handwritten/originals_b.jsonl \\
        --variants corpora/handwritten/variants_a.jsonl --variants corpora/handwritten/variants_b.jsonl \\
        --reference-texts corpora/handwritten/reference.jsonl \\
        --reference-texts corpora/handwritten/reference2.jsonl
    then a table for some originals only: attribution experiment table runs/hw --targets 'hw-b-*'
    """
    from attribution.workflows.experiment import CopyrightExperiment, run_copyright

    order_list = sorted({int(o) for o in orders.split(",") if o.strip()})
    if not order_list or any(o not in (1, 2) for o in order_list):
        raise UserError(f"--orders must list 1 and/or 2, got {orders!r}")
    if (originals or variants) and (pick is not None or ids):
        raise UserError("--pick and --ids choose originals from the corpus; with --originals they are given")
    if not pool_corpus and not originals and all(str(c).split(":")[0] == "builtin" for c in corpus):
        pool_corpus = ("builtin",)  # related documents exist in the full built-in corpus, not in a 10% split
    exp = CopyrightExperiment(
        corpus=list(corpus),
        out=out,
        pick=None if ids or originals else (8 if pick is None else pick),
        ids=[i.strip() for i in ids.split(",") if i.strip()] if ids else None,
        originals=list(originals),
        variants=list(variants),
        kinds=kinds,
        preset=preset,
        steps=steps,
        epochs=epochs,
        max_words=max_words,
        orders=order_list,
        optimizer=optimizer,
        optimizer_aware=optimizer_aware,
        pool_fraction=pool_fraction,
        pool_corpus=list(pool_corpus) or None,
        device=device,
        seed=seed,
        rewriter=make_rewriter_from(kw),
        run_overrides={
            **({"batch_size": batch_size} if batch_size else {}),
            **({"reference": reference} if reference is not None else {}),
            **({"reference_texts": tuple(map(str, reference_texts))} if reference_texts else {}),
        },
    )
    result = run_copyright(exp)
    click.echo(result.markdown)
    click.echo(
        f"\nwrote {out / 'table.csv'}, {out / 'table.md'}, {out / 'ranks.png'} in {result.seconds:.0f} s"
    )


@experiment.command("table")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--targets",
    "targets",
    multiple=True,
    metavar="PATTERN",
    help="Only the variants whose original's id matches this shell-style pattern (e.g. 'hw-b-*'); "
    "repeatable. Default: every variant.",
)
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the table as CSV (the columns of OUT/table.csv).",
)
@click.option(
    "--median",
    is_flag=True,
    help="In the views tables, the median rank in parentheses instead of every original's rank.",
)
def table_cmd(out: Path, targets: tuple[str, ...], csv_path: Path | None, median: bool) -> None:
    """Print the tables of a finished `experiment copyright` folder OUT for some of its originals.

    \b
    Recomputed from OUT/ranks.csv (one row per variant), so nothing is retrained: the headline
    table, then per order the views x kinds table with every original's rank and the control (the
    other originals' average rank for the same texts). E.g. the held-out half of the hand-written cases:
      attribution experiment table runs/hw --targets 'hw-b-*'
    """
    from attribution.workflows.experiment import table_for

    table, markdown = table_for(out, targets, each=not median)
    click.echo(markdown, nl=False)
    if csv_path is not None:
        with atomic_write(csv_path) as fh:
            table.to_csv(fh, index=False)
        click.echo(f"wrote {csv_path}", err=True)


commands: list[click.Command] = [variants_cmd, experiment]
