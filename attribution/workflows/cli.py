"""`attribution curate`: the command-line face of `attribution.workflows.curate`.

(`attribution experiment copyright` lives with the variants' options in `attribution.variants.cli`,
`attribution demo` with training in `attribution.train.cli`.)
"""

from __future__ import annotations

import time
from pathlib import Path

import click


@click.command("curate")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--drop",
    "drop",
    required=True,
    metavar="negative|bottom:PCT",
    help="Which documents to drop: every document with a negative value, or the lowest PCT percent.",
)
@click.option(
    "--val-set",
    default=None,
    metavar="NAME",
    help="Rank by value against this validation set and measure its loss (default: all sets, summed).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output directory: curves.csv/png, steps_to_target.csv, dropped*.csv, summary.md/json, runs/.",
)
@click.option(
    "--eval-every",
    type=int,
    default=None,
    help="Evaluate validation loss every N steps in the retrains (default: steps/30).",
)
@click.option(
    "--smooth",
    "smooth_window",
    type=int,
    default=3,
    show_default=True,
    help="Trailing mean over this many evaluations before comparing with the target (1 = raw).",
)
@click.option(
    "--control-seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the (first) random-drop control (same number of documents as the curated drop).",
)
@click.option(
    "--controls",
    "n_controls",
    type=int,
    default=1,
    show_default=True,
    help="Number of random-drop controls (seeds control-seed, control-seed+1, ...): more show the noise.",
)
@click.option(
    "--holdout",
    type=float,
    default=0.0,
    show_default=True,
    metavar="FRAC",
    help="Rank documents on 1-FRAC of the validation texts and measure loss on the other FRAC "
    "(needs per-text values); 0 = rank and measure on the same texts.",
)
@click.option(
    "--reuse-baseline",
    is_flag=True,
    help="Use RUN's own train_log as the baseline instead of retraining it (faster; RUN's evaluation "
    "interval then sets the baseline's resolution).",
)
def curate_command(
    run: Path,
    drop: str,
    val_set: str | None,
    out: Path,
    eval_every: int | None,
    smooth_window: int,
    control_seed: int,
    n_controls: int,
    holdout: float,
    reuse_baseline: bool,
) -> None:
    """Reproduce the paper's curation experiment on RUN's corpus.

    Retrains on RUN's schedule and seed three times: the full corpus (baseline), the corpus without the
    dropped documents (curated), and without as many randomly chosen documents (control). Reports how many
    steps each needs to reach the baseline's final validation loss.
    """
    from attribution.workflows.curate import curate, fmt_pct, fmt_steps

    r = curate(
        run,
        drop=drop,
        out=out,
        val_set=val_set,
        eval_every=eval_every,
        smooth_window=smooth_window,
        control_seed=control_seed,
        reuse_baseline=reuse_baseline,
        holdout=holdout,
        n_controls=n_controls,
    )
    click.echo(
        f"dropped {r.n_dropped}/{r.n_docs} documents ({r.dropped_fraction:.1%}); target {r.target:.4f}; "
        + "; ".join(f"{n}: {fmt_steps(s)} steps ({fmt_pct(r.saving[n])})" for n, s in r.steps.items())
    )
    click.echo(f"wrote {r.out / 'summary.md'}")


commands: list[click.Command] = [curate_command]


@click.command("claim")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--texts",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help='JSONL of the claim texts, one {"id", "text", "meta"} object a line.',
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output run directory (same files as a run, plus claims.md and claims.html).",
)
@click.option(
    "--docs",
    default=None,
    metavar="ID,...",
    help="Targeted mode: replay only the segments that train these documents and value only them.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Replay this many segments in parallel processes (values add up over steps: same result).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted claim replay in --out (finished segments are kept).",
)
@click.option(
    "--tolerance",
    type=float,
    default=None,
    help="Largest weight difference allowed at a kept checkpoint (default 0 = bitwise on CPU float32; "
    "1e-3 for GPU/bf16 runs, whose deviation is reported).",
)
@click.option(
    "--top",
    "top_k",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Documents per claim in claims.md / claims.html.",
)
@click.option(
    "--fast",
    is_flag=True,
    help="Candidates from the run's sketch index in seconds, then confirmed exactly; writes fast.csv and "
    "fast.md (estimate, exact value, exact rank among the candidates). Under the default view the index "
    "is the checkpoint similarity's and the confirmation its exact cosines (seconds); under the in-run "
    "views it is the in-run sketch's, confirmed by targeted exact replay.",
)
@click.option(
    "--k",
    "fast_k",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="--fast: candidate documents per claim.",
)
@click.option(
    "--no-confirm",
    "no_confirm",
    is_flag=True,
    help="--fast: stop at the sketch's estimates, without the exact confirmation (for the in-run views a "
    "targeted replay, which re-runs the training steps the candidates were trained in).",
)
@click.option(
    "--view",
    "fast_view",
    default=None,
    metavar="NAME",
    help="--fast: the view the sketch ranks by (standout_checkpoint, checkpoint_cosine: the checkpoint "
    "index; value, per_token, cosine, contrast, contrast_per_token, contrast_cosine, standout, "
    "standout_cosine: the in-run sketch; default: the run's default view).",
)
@click.option(
    "--in-run-cosine/--no-in-run-cosine",
    "in_run_cosine",
    default=None,
    help="Compute the per-sample gradient norms of the in-run cosine views (cosine, contrast_cosine, "
    "standout_cosine) in the replay. Default: as the run did (`attribution run --in-run-cosine`).",
)
def claim_command(
    run: Path,
    texts: Path,
    out: Path,
    docs: str | None,
    workers: int,
    resume: bool,
    tolerance: float | None,
    top_k: int,
    fast: bool,
    fast_k: int,
    no_confirm: bool,
    fast_view: str | None,
    in_run_cosine: bool | None,
) -> None:
    """Value texts that arrive after training against the finished run RUN, by exact replay.

    \b
    Replays RUN's training steps from its kept checkpoints (replay/), with the same batches and
    optimizer steps, valuing every training document against each claim text and against the run's
    fixed reference set. At every kept checkpoint the replayed weights must equal the stored ones
    (bitwise on CPU); a changed corpus or an altered checkpoint is refused with the step or file named.
    Example:
      attribution claim runs/demo --texts disputed.jsonl --out runs/demo-claims
    Several machines:  torchrun --nproc_per_node 2 -m attribution.cli claim ...
    """
    from attribution.errors import UserError
    from attribution.report.claims import write_claims_report
    from attribution.values.rundir import RunDir
    from attribution.workflows.claim import claim

    t0 = time.perf_counter()
    if fast and in_run_cosine is not None:
        raise UserError(
            "--in-run-cosine is for the exact replay; --fast turns it on when its --view needs it"
        )
    if fast:
        _fast(run, texts, out, docs, resume, fast_k, fast_view, workers, tolerance, t0, not no_confirm)
        return
    ids = [d.strip() for d in docs.split(",") if d.strip()] if docs else None
    run_dir = claim(
        run,
        texts,
        out,
        docs=ids,
        workers=workers,
        resume=resume,
        tolerance=tolerance,
        report=False,
        in_run_cosine=in_run_cosine,
    )
    if RunDir(
        run_dir
    ).manifest_path.is_file():  # rank 0 (the other torchrun ranks return after their segments)
        md, page = write_claims_report(run_dir, run_dir, top_k=top_k)
        click.echo(
            f"claims valued in {time.perf_counter() - t0:.1f} s: {run_dir} ({md.name}, {page.name})", err=True
        )


def _fast(
    run: Path,
    texts: Path,
    out: Path,
    docs: str | None,
    resume: bool,
    k: int,
    view: str | None,
    workers: int,
    tolerance: float | None,
    t0: float,
    confirm: bool = True,
) -> None:
    from attribution.errors import UserError
    from attribution.workflows.claim_fast import fast_claim

    if docs or resume:
        raise UserError("--fast chooses the documents itself and cannot resume; drop --docs / --resume")
    r = fast_claim(run, texts, out, k=k, view=view, workers=workers, tolerance=tolerance, confirm=confirm)
    for note in r.notes:
        click.echo(f"note: {note}", err=True)
    what = (
        f"confirmed {r.how}"
        if r.confirmed
        else "estimates only (" + ("--no-confirm" if not confirm else "no replay chain") + ")"
    )
    click.echo(
        f"{r.table['claim_id'].nunique()} claim(s), top {k} by the {r.view!r} sketch, {what}, in "
        f"{time.perf_counter() - t0:.1f} s: {r.out / 'fast.md'}",
        err=True,
    )


commands = [curate_command, claim_command]
