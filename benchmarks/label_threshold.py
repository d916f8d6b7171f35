"""Choose the `non-obvious influence` standout threshold on the tuning half, report it on the other half.

Input: `attribution compare` folders made with the standout test switched off
(`--threshold influence_z=-1e9`), so every pair's label is the rule *without* the test and its
`standout_z` column holds the z the test would use. A pair is then `non-obvious influence` at
threshold t when its label is and `standout_z >= t` (exactly what `compare` does at that threshold).

- **Control share:** among each text's Shapley top-k documents that are *not* its original (documents
  with no relation to the text), the share labelled `non-obvious influence`.
- **Choice:** the smallest threshold of the grid whose control share is at most `--target` (5%) on the
  tuning half (`--tune`, default `hw-a-`) in every folder given (one per seed).
- **Report:** the control share at that threshold on the held-out half (`--report`, `hw-b-`), the
  label counts before (no standout test) and after, and how many originals keep the label.

    .venv/bin/python benchmarks/label_threshold.py /tmp/hw/s0/cmp /tmp/hw/s1/cmp [--demo /tmp/demo_cmp]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

LABEL = "non-obvious influence"
GRID = [3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 50.0]


def _top(folder: Path, prefix: str | None, k: int) -> pd.DataFrame:
    c = pd.read_parquet(folder / "comparison.parquet")
    if prefix:
        c = c[c["val_id"].astype(str).str.startswith(prefix)]
    return c[c["shapley_rank"] <= k]


def labelled(top: pd.DataFrame, threshold: float) -> pd.Series:
    return (top["label"] == LABEL) & (top["standout_z"].fillna(-np.inf) >= threshold)


def control_share(top: pd.DataFrame, threshold: float) -> tuple[float, int, int]:
    unrelated = top[~top["is_target"].astype(bool)]
    hits = int(labelled(unrelated, threshold).sum())
    return hits / max(len(unrelated), 1), hits, len(unrelated)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="compare folders (test off), one per seed")
    ap.add_argument("--tune", default="hw-a-")
    ap.add_argument("--report", default="hw-b-")
    ap.add_argument("--target", type=float, default=0.05)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--demo", type=Path, default=None, help="a compare folder of the demo (test off)")
    args = ap.parse_args()

    tune = [_top(f, args.tune, args.k) for f in args.folders]
    lines = ["| threshold | " + " | ".join(f"{f.parent.name} control share" for f in args.folders) + " |"]
    lines.append("|---|" + "---|" * len(args.folders))
    chosen = None
    for t in GRID:
        shares = [control_share(top, t) for top in tune]
        lines.append(f"| {t:g} | " + " | ".join(f"{s:.3f} ({h}/{n})" for s, h, n in shares) + " |")
        if chosen is None and all(s <= args.target for s, _, _ in shares):
            chosen = t
    print(f"Tuning half `{args.tune}*`, Shapley top {args.k}, unrelated documents:\n")
    print("\n".join(lines))
    print(
        f"\nChosen influence_z: {chosen} (smallest with control share <= {args.target:.0%} in every seed)\n"
    )
    if chosen is None:
        return
    sets = [(f.parent.name, _top(f, args.report, args.k)) for f in args.folders]
    sets += [("demo", _top(args.demo, None, args.k))] if args.demo else []
    print(f"Held-out `{args.report}*` (and the demo), at {chosen:g}:\n")
    print(
        "| run | top-k pairs | before: non-obvious | after | control share before | after | originals labelled after |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, top in sets:
        before = int((top["label"] == LABEL).sum())
        after = int(labelled(top, chosen).sum())
        cb, cbh, cbn = control_share(top, -np.inf)
        ca, cah, can = control_share(top, chosen)
        tg = top[top["is_target"].astype(bool)]
        print(
            f"| {name} | {len(top)} | {before} ({before / max(len(top), 1):.1%}) | {after} ({after / max(len(top), 1):.1%}) "
            f"| {cb:.3f} ({cbh}/{cbn}) | {ca:.3f} ({cah}/{can}) | {int(labelled(tg, chosen).sum())} of {len(tg)} |"
        )


if __name__ == "__main__":
    main()
