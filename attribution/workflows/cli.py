"""`attribution curate`: the command-line face of `attribution.workflows.curate`.

(`attribution experiment copyright` lives with the variants' options in `attribution.variants.cli`,
`attribution demo` with training in `attribution.train.cli`.)
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("curate")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--drop", "drop", required=True, metavar="negative|bottom:PCT",
              help="Which documents to drop: every document with a negative value, or the lowest PCT percent.")
@click.option("--val-set", default=None, metavar="NAME",
              help="Rank by value against this validation set and measure its loss (default: all sets, summed).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory: curves.csv/png, steps_to_target.csv, dropped*.csv, summary.md/json, runs/.")
@click.option("--eval-every", type=int, default=None,
              help="Evaluate validation loss every N steps in the retrains (default: steps/30).")
@click.option("--smooth", "smooth_window", type=int, default=3, show_default=True,
              help="Trailing mean over this many evaluations before comparing with the target (1 = raw).")
@click.option("--control-seed", type=int, default=0, show_default=True,
              help="Seed of the (first) random-drop control (same number of documents as the curated drop).")
@click.option("--controls", "n_controls", type=int, default=1, show_default=True,
              help="Number of random-drop controls (seeds control-seed, control-seed+1, ...): more show the noise.")
@click.option("--holdout", type=float, default=0.0, show_default=True, metavar="FRAC",
              help="Rank documents on 1-FRAC of the validation texts and measure loss on the other FRAC "
                   "(needs per-text values); 0 = rank and measure on the same texts.")
@click.option("--reuse-baseline", is_flag=True,
              help="Use RUN's own train_log as the baseline instead of retraining it (faster; RUN's evaluation "
                   "interval then sets the baseline's resolution).")
def curate_command(run: Path, drop: str, val_set: str | None, out: Path, eval_every: int | None,
                   smooth_window: int, control_seed: int, n_controls: int, holdout: float,
                   reuse_baseline: bool) -> None:
    """Reproduce the paper's curation experiment on RUN's corpus.

    Retrains on RUN's schedule and seed three times: the full corpus (baseline), the corpus without the
    dropped documents (curated), and without as many randomly chosen documents (control). Reports how many
    steps each needs to reach the baseline's final validation loss.
    """
    from attribution.workflows.curate import curate, fmt_pct, fmt_steps

    r = curate(run, drop=drop, out=out, val_set=val_set, eval_every=eval_every, smooth_window=smooth_window,
               control_seed=control_seed, reuse_baseline=reuse_baseline, holdout=holdout, n_controls=n_controls)
    click.echo(
        f"dropped {r.n_dropped}/{r.n_docs} documents ({r.dropped_fraction:.1%}); target {r.target:.4f}; "
        + "; ".join(f"{n}: {fmt_steps(s)} steps ({fmt_pct(r.saving[n])})" for n, s in r.steps.items())
    )
    click.echo(f"wrote {r.out / 'summary.md'}")


commands: list[click.Command] = [curate_command]
