"""Rank a copyright-experiment run that was trained elsewhere (`benchmarks/gpu_heldout.py`), as the
experiment ranks its own: every view of the run, the text baselines, `ranks.csv` and the tables.

    .venv/bin/python benchmarks/rank_run.py /tmp/hw/s1 --seed 1 \
        --originals corpora/handwritten/originals_a.jsonl --originals corpora/handwritten/originals_b.jsonl \
        --variants corpora/handwritten/variants_a.jsonl --variants corpora/handwritten/variants_b.jsonl

FOLDER/run-order1 must hold the finished run (unpacked from the GPU's tarball); nothing is trained.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from attribution.workflows import experiment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", action="append", default=None)
    ap.add_argument("--originals", action="append", required=True)
    ap.add_argument("--variants", action="append", required=True)
    args = ap.parse_args()
    exp = experiment.CopyrightExperiment(
        corpus=args.corpus or ["builtin:200"],
        out=args.folder,
        orders=(1,),
        seed=args.seed,
        originals=args.originals,
        variants=args.variants,
    )
    started = time.time()
    docs, targets, pool, records, _ = experiment._plan(exp)
    result = experiment.rank_runs(exp, {1: args.folder / "run-order1"}, docs, targets, pool, records, started)
    print(result.table.to_string())


if __name__ == "__main__":
    main()
