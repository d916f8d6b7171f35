"""How the checkpoint cosine's standout z is scaled (issue 13, session 20): re-rank finished experiments.

The standout z divides a document's excess over its mean for a text's nearest reference texts by a
scale. Candidates, after Smyth's (2004) moderated variance (limma's moderated t):

    s~^2 = (d0 * s0^2 + d * s^2) / (d0 + d),    d = (reference texts) - 1,

`s^2` the document's sample variance over the same reference texts, `s0^2` the median of it over the
documents: `d0 = 0` is each document's own sd, `d0 = inf` one pooled scale per text
(`views.POOLED_SCALE`, the default since session 20); `eb` estimates `d0` and `s0^2` per text by Smyth's
moment method on `log s^2`. Each candidate replaces `views.reference_moments` while the experiment's own
`_irs_ranks` ranks the originals again, so nothing is retrained (so the runs must hold more reference texts
than `views.NEAREST_REFERENCE`, as the hand-written experiments' 48 do: with fewer the z takes another path). Prints, per candidate and folder, the
mean and individual ranks of the originals matching `--targets` under `standout_checkpoint`, the
control, and whether every goal of issue 13 is met (`heldout_views._checks`).

    .venv/bin/python benchmarks/standout_scale.py /tmp/hw/n36s0 /tmp/hw/n36s1 /tmp/hw/c19 --targets 'hw-a-*'
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import optimize, special

from attribution.values import views
from attribution.values.rundir import DOCS, RunDir
from attribution.workflows import experiment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout_views import _checks  # noqa: E402

COLUMN = experiment.method_column(1, "standout_checkpoint")
CANDIDATES = ("0", "eb", "4", "12", "36", "108", "inf")


def _trigamma_inverse(x: float) -> float:
    return float(np.exp(optimize.brentq(lambda ly: special.polygamma(1, np.exp(ly)) - x, -30, 30)))


def _prior(s2: np.ndarray, d: np.ndarray) -> tuple[float, float]:
    """Smyth's moment estimates of (d0, s0^2) from the variances `s2` on `d` degrees of freedom."""
    z = np.log(s2)
    e = z - special.digamma(d / 2) + np.log(d / 2)
    excess = np.var(z, ddof=1) - special.polygamma(1, d / 2).mean()
    if excess <= 0:
        return np.inf, float(np.exp(e.mean()))
    d0 = 2 * _trigamma_inverse(excess)
    return d0, float(np.exp(e.mean() + special.digamma(d0 / 2) - np.log(d0 / 2)))


def moderated(candidate: str) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """`views.reference_moments` with the candidate's scale in place of each document's sd."""
    plain = views.reference_moments

    def moments(ref: np.ndarray, min_n: int = views.MIN_REFERENCE, pooled: bool = False):
        mu, sd = plain(ref, min_n)
        d = np.isfinite(ref).sum(axis=1) - 1.0
        s2 = sd**2
        ok = np.isfinite(s2) & (s2 > 0)
        if candidate == "eb":
            d0, s02 = _prior(s2[ok], d[ok])
        else:
            d0, s02 = float(candidate), float(np.median(s2[ok]))
        s2m = np.full_like(s2, s02) if np.isinf(d0) else (d0 * s02 + d * s2) / (d0 + d)
        return mu, np.where(np.isfinite(sd), np.sqrt(s2m), np.nan)

    return moments


def ranks(folder: Path, candidate: str, targets: str) -> tuple[pd.DataFrame, int]:
    """The originals' ranks under `standout_checkpoint` with the candidate's scale, for the variants of
    the originals matching `targets` in the finished experiment `folder`."""
    exp = json.loads((folder / "experiment.json").read_text())
    run_dir = Path(exp["runs"]["1"])
    root = Path(__file__).resolve().parents[1]
    records = [
        r
        for f in exp["handwritten"]["variants"]
        for r in map(json.loads, (root / f).read_text(encoding="utf-8").splitlines())
        if fnmatch.fnmatch(r["meta"]["target_id"], targets)
    ]
    train_ids = RunDir(run_dir).table(DOCS, ["doc_id"], required=True)["doc_id"].tolist()
    saved = views.reference_moments
    views.reference_moments = moderated(candidate)
    try:
        by_view, _ = experiment._irs_ranks(run_dir, 1, records, train_ids, exp["originals"])
    finally:
        views.reference_moments = saved
    r = pd.DataFrame(
        {
            "variant": [x["meta"]["variant"] for x in records],
            COLUMN: by_view[COLUMN],
            f"control_{COLUMN}": by_view[f"control_{COLUMN}"],
        }
    )
    return r, len(train_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="finished copyright experiments")
    ap.add_argument(
        "--targets", default="hw-a-*", help="originals whose variants are ranked (the tuning half)"
    )
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help="d0 values, 'inf' and 'eb'")
    args = ap.parse_args()
    rows = []
    for candidate in args.candidates.split(","):
        for folder in args.folders:
            r, n = ranks(folder, candidate, args.targets)
            checks = _checks(r, COLUMN, n)
            kinds = {
                k: r.loc[r.variant == k, COLUMN].to_numpy()
                for k in ("partial", "paraphrase", "significant", "similar")
            }
            rows.append(
                {
                    "d0": candidate,
                    "run": folder.name,
                    **{k: f"{v.mean():.2f} {[float(x) for x in v]}" for k, v in kinds.items()},
                    "control": round(float(r[f"control_{COLUMN}"].mean()), 1),
                    "every goal": all(met for _, met, _ in checks),
                    "mean": float(np.mean([v.mean() for v in kinds.values()])),
                }
            )
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(
        table.groupby("d0", sort=False)
        .agg(mean=("mean", "mean"), every_goal=("every goal", "all"))
        .to_string()
    )


if __name__ == "__main__":
    main()
