"""`attribution report`: turn a run directory into a contribution and royalty report."""

from __future__ import annotations

import click

from attribution.report.royalty import DEFAULT_RULE, RULES


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option(
    "--runs",
    "more_runs",
    multiple=True,
    type=click.Path(file_okay=False, exists=True),
    help="More run directories of the same corpus with other seeds (repeat, or list them after "
    "--runs). The runs are merged: document values are averaged and the report shows the "
    "seed-to-seed spread; confidence intervals then come from resampling the runs.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder, e.g. reports/NAME. Gets report.html, report.md, sources.csv, owners.csv "
    "and figures/*.png.",
)
@click.option(
    "--by",
    type=click.Choice(["source", "owner"]),
    default="source",
    show_default=True,
    help="Which table leads the report (and whose top documents are shown). Both CSV files are "
    "always written.",
)
@click.option(
    "--pool",
    default="100",
    show_default=True,
    help="The amount to split between the groups. Royalties are rounded to cents and sum to it exactly.",
)
@click.option(
    "--currency", default="units", show_default=True, help="Currency label printed with the pool, e.g. USD."
)
@click.option(
    "--rule",
    type=click.Choice(list(RULES)),
    default=DEFAULT_RULE,
    show_default=True,
    help="How values become shares. positive-share: negative document values count as 0, then "
    "shares are proportional. proportional-clipped: also caps each document at the 99th "
    "percentile of positive values. shapley-signed: signed values, negative documents reduce "
    "their group's share. Every rule works per document, so splitting an owner cannot raise "
    "its payment.",
)
@click.option(
    "--val-set",
    "val_set",
    multiple=True,
    help="Validation set(s) the royalty is based on (repeat for several). Default: all sets summed.",
)
@click.option(
    "--compare",
    "compare_dir",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Output folder of `attribution compare`; its n-gram, semantic and label evidence is shown "
    "per validation example.",
)
@click.option(
    "--bootstrap",
    "n_boot",
    default=200,
    show_default=True,
    type=click.IntRange(20, 100000),
    help="Bootstrap replicates for the confidence intervals.",
)
@click.option(
    "--examples",
    "max_examples",
    default=20,
    show_default=True,
    type=click.IntRange(0, 10000),
    help="How many validation examples get a per-example evidence table.",
)
@click.option(
    "--no-semantic",
    is_flag=True,
    help="Skip the MiniLM semantic similarity in the per-example evidence (faster).",
)
def report(
    runs, more_runs, out, by, pool, currency, rule, val_set, compare_dir, n_boot, max_examples, no_semantic
):
    """Write a contribution and royalty report, per source and per rights holder, for a finished run.

    \b
    The report is written for readers who are not ML engineers: it states the rule it used, how each
    number was computed and the limits of the method. report.html is self-contained (works offline);
    the CSV and Markdown files are byte-identical when rebuilt from the same run.

    \b
    Example:
      attribution report runs/demo --out reports/demo --pool 10000 --currency USD
      attribution report runs/s0 --runs runs/s1 runs/s2 --out reports/seeds --by owner
    """
    from attribution.report.build import build_report

    result = build_report(
        list(runs) + list(more_runs),
        out,
        by=by,
        pool=pool,
        currency=currency,
        rule=rule,
        val_set=list(val_set) or None,
        compare_dir=compare_dir,
        n_boot=n_boot,
        max_examples=max_examples,
        semantic=not no_semantic,
    )
    for f in result.files:
        click.echo(str(f))


commands = [report]
