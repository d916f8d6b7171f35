"""Choose the checkpoint similarity's exponent of Adam's K on the tuning half, report the other half.

`attribution.workflows.checkpoint_similarity` weighs each side's gradient by `K^(power/2)`: power 1 is
the metric of one Adam update, power 2 TrackStar's (each side divided by sqrt(v)), power 0 no Adam
normalization. For finished `attribution experiment copyright` folders on the hand-written cases
(one per seed), this computes the checkpoint cosines of each run at every power (cached beside the run
as `checkpoint_values_powers.parquet`) and ranks each variant's original among the training documents
under `checkpoint_cosine` and `standout_checkpoint`, exactly as the experiment ranks its views.

    .venv/bin/python benchmarks/checkpoint_power.py /tmp/hw/s0 /tmp/hw/s1 --powers 0,1,2

Printed: per power and view, the mean rank per kind on the tuning half (`--tune`, averaged over the
seeds; the choice), then on the held-out half (`--report`, per seed; reported only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from attribution.values.ranks import rank_and_control
from attribution.values.views import VIEWS
from attribution.workflows import checkpoint_similarity as cs
from attribution.workflows.experiment import select_targets

KINDS = ("partial", "paraphrase", "significant", "similar")
CANDIDATES = ("checkpoint_cosine", "standout_checkpoint")


def table(run: Path, powers: list[float]) -> pd.DataFrame:
    """The run's checkpoint cosines at every power (cached beside the run)."""
    path = run / "checkpoint_values_powers.parquet"
    have = pd.read_parquet(path) if path.is_file() else None
    if have is None or any(cs.power_column(p) not in have.columns for p in powers):
        have = cs.for_run(run, powers=powers, progress=True)
        have.to_parquet(path)
    return have


def ranks(folder: Path, power: float, powers: list[float]) -> pd.DataFrame:
    """ranks.csv's variant rows with one `<view>` and `control_<view>` column per candidate view."""
    run = folder / "run-order1"
    base = pd.read_csv(folder / "ranks.csv", dtype={"id": str, "target_id": str, "variant": str})
    train_ids = pd.read_parquet(run / "docs.parquet", columns=["doc_id"])["doc_id"].astype(str).tolist()
    row = {d: i for i, d in enumerate(train_ids)}
    originals = sorted(set(base["target_id"]))
    ev = table(run, powers).rename(columns={cs.power_column(power): cs.COLUMN})
    out = base[["variant", "id", "target_id"]].copy()
    for view in CANDIDATES:
        ev[view] = VIEWS[view].fn(ev, pd.DataFrame({"doc_id": train_ids})).to_numpy()
        groups = {k: g for k, g in ev.groupby(["val_set", "val_id"], sort=False)}
        got, control = [], []
        for r in out.itertuples():
            g = groups[(r.variant, r.id)]
            scores = np.zeros(len(train_ids))
            scores[g["doc_id"].map(row).to_numpy()] = g[view].to_numpy()
            others = [row[t] for t in originals if t != r.target_id]
            rank, ctl = rank_and_control(scores, row[r.target_id], others)
            got.append(rank)
            control.append(ctl)
        out[view], out[f"control_{view}"] = got, control
    return out


def summary(frames: list[pd.DataFrame], pattern: str) -> pd.DataFrame:
    rows = []
    for view in CANDIDATES:
        per = []
        for f in frames:
            r = select_targets(f, [pattern])
            per.append(
                {**r.groupby("variant")[view].mean().to_dict(), "control": r[f"control_{view}"].mean()}
            )
        mean = pd.DataFrame(per).mean()
        rows.append({"view": view, **mean.to_dict(), "mean_rank": mean[list(KINDS)].mean()})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--powers", default="0,1,2")
    ap.add_argument("--tune", default="hw-a-*")
    ap.add_argument("--report", default="hw-b-*")
    args = ap.parse_args()
    tuned, reported = [], []
    powers = [float(p) for p in args.powers.split(",")]
    for power in powers:
        frames = [ranks(f, power, powers) for f in args.folders]
        tuned.append(summary(frames, args.tune).assign(power=power))
        for f, fr in zip(args.folders, frames, strict=True):
            r = select_targets(fr, [args.report])
            for view in CANDIDATES:
                by = r.groupby("variant")[view].apply(lambda x: f"{x.mean():.1f} {list(x.astype(int))}")
                reported.append({"seed": f.name, "power": power, "view": view, **by.to_dict()})
    cols = ["power", "view", *KINDS, "control", "mean_rank"]
    print(f"## Tuning half ({args.tune}), mean over {', '.join(f.name for f in args.folders)}\n")
    print(pd.concat(tuned)[cols].round(2).sort_values("mean_rank").to_string(index=False))
    print(f"\n## Held-out half ({args.report}), reported only\n")
    print(pd.DataFrame(reported).to_string(index=False))


if __name__ == "__main__":
    main()
