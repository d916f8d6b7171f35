"""Re-rank a finished copyright experiment with the current views, without retraining (issue 13).

`attribution experiment copyright` reuses a finished run only when its configuration is exactly the
current code's; a run made by older code (a `RunConfig` field added since) is retrained. This recomputes
the attribution views' columns of `SRC/ranks.csv` with the experiment's own `_irs_ranks` over the same
run and variant records, keeps the text baselines (BM25, MiniLM, n-gram) as they were, and writes
`DST/ranks.csv`, `DST/table.csv` and `DST/experiment.json`, which `benchmarks/heldout_views.py DST` reads.

    .venv/bin/python benchmarks/rerank.py /tmp/hw/c19 /tmp/s20/c19p
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd

from attribution.values.rundir import DOCS, RunDir
from attribution.workflows import experiment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="a finished experiment folder")
    ap.add_argument("dst", type=Path, help="where the re-ranked ranks.csv, table.csv and experiment.json go")
    args = ap.parse_args()
    exp = json.loads((args.src / "experiment.json").read_text())
    root = Path(__file__).resolve().parents[1]
    records = [
        json.loads(line)
        for f in exp["handwritten"]["variants"]
        for line in (root / f).read_text(encoding="utf-8").splitlines()
    ]
    run_dir = Path(exp["runs"]["1"])
    train_ids = RunDir(run_dir).table(DOCS, ["doc_id"], required=True)["doc_id"].tolist()
    ranks = pd.read_csv(args.src / "ranks.csv", dtype={"id": str, "target_id": str, "variant": str})
    if list(ranks["id"]) != [r["id"] for r in records]:
        raise SystemExit(
            f"{args.src / 'ranks.csv'}: its rows are not the experiment's variant files' records"
        )
    by_view, _ = experiment._irs_ranks(run_dir, 1, records, train_ids, exp["originals"])
    for column, values in by_view.items():
        ranks[column] = values
    args.dst.mkdir(parents=True, exist_ok=True)
    ranks.to_csv(args.dst / "ranks.csv", index=False)
    experiment.summarize(ranks, len(train_ids)).to_csv(args.dst / "table.csv", index=False)
    shutil.copy(args.src / "experiment.json", args.dst / "experiment.json")
    print(f"re-ranked {len(ranks)} variants of {args.src} into {args.dst}")


if __name__ == "__main__":
    main()
