"""Run the copyright experiment once and print the attribution views x variant kinds table.

Cells = average rank of the original among all training documents (1 = top), under each view of
the same run's per-example values; BM25 (text only) for comparison. Usage:

    .venv/bin/python benchmarks/views_copyright.py --out /tmp/views_exp [--epochs 1] [--plain]

A finished run with the same configuration is reused (the experiment checks its manifest).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from attribution import views
from attribution.experiment import CopyrightExperiment, rank_of, run_copyright


def view_ranks(run_dir: Path, ranks: pd.DataFrame) -> pd.DataFrame:
    """Rank of the original for every (record, view) of one run."""
    ev = pd.read_parquet(run_dir / "example_values.parquet")
    ev = ev.loc[:, ev.notna().any()]  # value_cosine is null when the run had no gradient norms
    docs = pd.read_parquet(run_dir / "docs.parquet", columns=["doc_id", "n_tokens"])
    train_ids = docs["doc_id"].astype(str).tolist()
    row = {d: i for i, d in enumerate(train_ids)}
    names = views.available(ev, docs)
    scored = views.compute(ev, docs, names)
    groups = {k: g for k, g in scored.groupby(["val_set", "val_id"], sort=False)}
    out = []
    for rec in ranks.itertuples():
        g = groups[(rec.variant, rec.id)]
        idx = g["doc_id"].astype(str).map(row).to_numpy()
        item = {"variant": rec.variant, "id": rec.id}
        for name in names:
            s = np.full(len(train_ids), -np.inf)  # never-trained documents rank last
            s[idx] = g[views.column_of(name)].to_numpy()
            item[name] = rank_of(s, row[rec.target_id])
        out.append(item)
    return pd.DataFrame(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--corpus", default="builtin:600")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--pick", type=int, default=12)
    ap.add_argument("--max-words", type=int, default=400)
    ap.add_argument("--plain", action="store_true", help="SGD-proxy values instead of AdamW-preconditioned ones")
    args = ap.parse_args()
    exp = CopyrightExperiment(corpus=[args.corpus], out=args.out, pick=args.pick, epochs=args.epochs, orders=(1,), max_words=args.max_words,
                              run_overrides={"optimizer_aware": not args.plain})
    result = run_copyright(exp)
    run_dir = result.run_dirs[1]
    vr = view_ranks(run_dir, result.ranks)
    vr["bm25"] = result.ranks["bm25"].to_numpy()
    n_train = len(pd.read_parquet(run_dir / "docs.parquet", columns=["doc_id"]))
    table = vr.drop(columns="id").groupby("variant", sort=False).mean().T
    table.index.name = f"view (avg rank of original among {n_train} docs)"
    print(table.round(1).to_string())
    vr.to_csv(args.out / "view_ranks.csv", index=False)
    (args.out / "views_table.txt").write_text(table.round(1).to_string() + "\n")
    print(json.dumps({"seconds": round(result.seconds), "run": str(run_dir)}))


if __name__ == "__main__":
    main()
