"""The held-out protocol of issue 13: choose the default view on the tuning half, report the other half.

Given finished `attribution experiment copyright --originals ... --variants ...` folders (one per seed,
same settings) on the hand-written cases (`corpora/handwritten/`):

1. **Choice, on the tuning half only** (`--tune`, default `hw-a-*`): for every attribution view the
   runs have, the mean rank of the original over the four variant kinds, averaged over the seeds. A
   view is admissible when it meets every goal of issue 13 on the tuning half of every seed (`_checks`:
   partial and paraphrase rank 1 for every original, significant within the top 2%, similar better than
   chance, and the control, the other originals' mean rank, within `CONTROL_BAND` ranks of chance).
   The admissible view with the lowest mean rank wins; with none admissible, the lowest mean rank (ties
   to the control nearer chance). Nothing of the held-out half is read for this. (Until session 18 the
   lowest mean rank won whatever its control.)
2. **Report, on the held-out half only** (`--report`, default `hw-b-*`): per seed, the views x kinds
   table with every original's rank, the text baselines (BM25, MiniLM, 8-gram containment) and a
   control column, from `attribution.workflows.experiment.table_for`; then the goals of the issue
   checked for the chosen view.

    .venv/bin/python benchmarks/heldout_views.py /tmp/hw/s0 /tmp/hw/s1 [--out docs/heldout.md]

Nothing is retrained: the ranks come from each folder's `ranks.csv`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from attribution.values.views import VIEWS
from attribution.workflows.experiment import KINDS, method_column, select_targets, table_for

GOAL_KINDS = ("partial", "paraphrase", "significant", "similar")


def _ranks(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "ranks.csv", dtype={"id": str, "target_id": str, "variant": str})


CONTROL_BAND = 10.0  # "near chance": the control within this many ranks of (n + 1) / 2


def _checks(r: pd.DataFrame, col: str, n: int) -> list[tuple[str, bool, np.ndarray]]:
    """Issue 13's goals for the ranks `r` (one half of one seed) under column `col`, `n` documents:
    (what, met, the ranks it was judged on)."""
    chance = (n + 1) / 2
    by = {k: r.loc[r.variant == k, col].to_numpy() for k in GOAL_KINDS}
    top2 = max(1.0, 0.02 * n)
    control = np.array([r[f"control_{col}"].mean()])
    return [
        ("partial: rank 1 for every original", bool((by["partial"] <= 1).all()), by["partial"]),
        ("paraphrase: rank 1 for every original", bool((by["paraphrase"] <= 1).all()), by["paraphrase"]),
        (
            f"significant: within the top 2% (rank <= {top2:g})",
            bool((by["significant"] <= top2).all()),
            by["significant"],
        ),
        (
            f"similar: better than chance ({chance:g}) for every original",
            bool((by["similar"] < chance).all()),
            by["similar"],
        ),
        (
            f"control near chance ({chance:g} +- {CONTROL_BAND:g})",
            bool(abs(control[0] - chance) <= CONTROL_BAND),
            control,
        ),
    ]


def _n_docs(folder: Path) -> int:
    return int(json.loads((folder / "experiment.json").read_text())["n_train_docs"])


def tuning_scores(folders: list[Path], pattern: str, order: int = 1) -> pd.DataFrame:
    """Per view: mean rank per kind on the tuning half averaged over seeds, the overall mean, the control
    and whether every goal holds on every seed; sorted admissible first, then by mean rank."""
    rows = []
    for view in VIEWS:
        col = method_column(order, view)
        per_seed, admissible = [], True
        for f in folders:
            r = select_targets(_ranks(f), [pattern])
            if col not in r.columns:
                break
            kinds = r.groupby("variant")[col].mean()
            per_seed.append({**kinds.to_dict(), "control": r[f"control_{col}"].mean()})
            admissible &= all(ok for _, ok, _ in _checks(r, col, _n_docs(f)))
        else:
            mean = pd.DataFrame(per_seed).mean()
            chance = (_n_docs(folders[0]) + 1) / 2
            rows.append(
                {
                    "view": view,
                    **mean.to_dict(),
                    "mean_rank": mean[list(GOAL_KINDS)].mean(),
                    "admissible": admissible,
                    "off_chance": abs(mean["control"] - chance),
                }
            )
    df = pd.DataFrame(rows)
    df["inadmissible"] = ~df["admissible"]
    return (
        df.sort_values(["inadmissible", "mean_rank", "off_chance"])
        .drop(columns="inadmissible")
        .reset_index(drop=True)
    )


def goals(folders: list[Path], view: str, pattern: str, order: int = 1) -> list[str]:
    """The issue's goals under `view` on the held-out half, per seed."""
    col = method_column(order, view)
    lines = []
    for f in folders:
        lines.append(f"- {f.name}:")
        for what, ok, ranks in _checks(select_targets(_ranks(f), [pattern]), col, _n_docs(f)):
            verdict = "met" if ok else "not met"
            lines.append(f"  - {what}: **{verdict}** ({', '.join(f'{x:g}' for x in np.round(ranks, 1))})")
    return lines


def _markdown(df: pd.DataFrame) -> str:
    rows = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    rows += [
        "| " + " | ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in r) + " |"
        for r in df.itertuples(index=False)
    ]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="finished experiment folders, one per seed")
    ap.add_argument("--tune", default="hw-a-*", help="originals the choice is made on")
    ap.add_argument("--report", default="hw-b-*", help="originals the figures are reported on")
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = ap.parse_args()

    scores = tuning_scores(args.folders, args.tune)
    chosen = scores.iloc[0]["view"]
    cols = ["view", *[k for k in KINDS if k in scores.columns], "control", "mean_rank", "admissible"]
    lines = [
        f"## Choice on the tuning half (`{args.tune}`), mean over seeds {', '.join(f.name for f in args.folders)}",
        "",
        "Mean rank of the original per kind (averaged over the seeds), their mean, and the control.",
        "",
        _markdown(scores[cols].round(2)),
        "",
        f"Chosen: **{chosen}** ("
        + (
            "the lowest mean rank over the four kinds among the views meeting every goal on every seed)."
            if scores.iloc[0]["admissible"]
            else "no view meets every goal on every seed: the lowest mean rank over the four kinds)."
        ),
        "",
        f"## Report on the held-out half (`{args.report}`)",
        "",
    ]
    for f in args.folders:
        _, md = table_for(f, [args.report])
        lines += [f"### {f.name}", "", md, ""]
    lines += [f"### Goals under `{chosen}` on `{args.report}`", "", *goals(args.folders, chosen, args.report)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
