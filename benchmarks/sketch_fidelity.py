"""Fast claims (sketch index) against the full exact replay: Spearman over all documents, recall@10.

Small by default (a test-micro run on a generated corpus, about a minute on 2 cores). On a real run:

    .venv/bin/python benchmarks/sketch_fidelity.py --run runs/demo --claims claims.jsonl \
        --dims 64,256,1024 --out /tmp/sketch_fidelity

For every dimension other than the run's own, the run is trained again with that `--sketch-dim`
(same seed, corpus and settings, so the same trajectory and values) into `--out/dim_K`; the exact
values come from one full replay of RUN (`attribution claim`). Per claim, view (raw value and the
run's default view) and dimension: Spearman between estimate and exact value over every trained
document, and recall@10 (the share of the exact top 10 in the sketch's top 10).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import pandas as pd


def _tiny_run(out: Path) -> tuple[Path, Path]:
    """A 40-step test-micro run on 60 generated documents, and 4 claims (3 excerpts, 1 unrelated text)."""
    from attribution.train import RunConfig, train_and_value

    words = (
        "the court held that copyright protects original expression but not ideas facts or methods and a model "
        "trained on licensed text must still credit every owner whose work lowered its loss"
    ).split()
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(10, 70))) for _ in range(60)]
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(
            json.dumps({"id": f"d{i}", "text": t, "meta": {"pile_set_name": "s"}}) + "\n"
            for i, t in enumerate(docs)
        )
    with open(out / "val.jsonl", "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "v0", "text": " ".join(rng.choice(words) for _ in range(30))}) + "\n")
    claims = {f"c{i}": docs[i][:150] for i in range(3)} | {"c_other": "an unrelated note about the weather"}
    with open(out / "claims.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"id": k, "text": v}) + "\n" for k, v in claims.items())
    cfg = RunConfig(
        corpus=[str(out / "corpus.jsonl")],
        val={"v": str(out / "val.jsonl")},
        out=str(out / "run"),
        preset="test-micro",
        steps=40,
        keep_every=10,
        reference=4,
        device="cpu",
        progress=False,
        cache_dir=str(out / "cache"),
    )
    return train_and_value(cfg), out / "claims.jsonl"


def _with_dim(run: Path, dim: int, out: Path) -> Path:
    from attribution.train import train_and_value
    from attribution.values.manifest import Manifest
    from attribution.workflows.claim_fast import _config

    cfg = _config(Manifest.read(run))
    if cfg.sketch_dim == dim:
        return run
    target = out / f"dim_{dim}"
    if (target / "sketch" / "meta.json").is_file():
        return target
    return train_and_value(dataclasses.replace(cfg, sketch_dim=dim, out=str(target)))


def _recall(est: pd.Series, exact: pd.Series, k: int = 10) -> float:
    top = set(exact.nlargest(k).index)
    return len(top & set(est.nlargest(k).index)) / max(1, len(top))


def main() -> None:
    from attribution.values.results import RunValues
    from attribution.workflows.claim import claim
    from attribution.workflows.claim_fast import estimate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--run", type=Path, default=None, help="a finished run with a replay chain (default: a tiny one)"
    )
    ap.add_argument("--claims", type=Path, default=None, help="JSONL claim texts (required with --run)")
    ap.add_argument("--dims", default="32,256", help="sketch dimensions, comma separated")
    ap.add_argument("--out", type=Path, default=Path("/tmp/sketch_fidelity"))
    ap.add_argument("--workers", type=int, default=1, help="processes for the full exact replay")
    args = ap.parse_args()
    run, claims = (args.run, args.claims) if args.run else _tiny_run(args.out / "tiny")
    if claims is None:
        raise SystemExit("--claims is required with --run")
    full = args.out / "full"
    if not (full / "manifest.json").is_file():
        t0 = time.perf_counter()
        claim(run, claims, full, workers=args.workers, report=False)
        print(f"full exact replay: {time.perf_counter() - t0:.1f} s")
    exact_rv = RunValues.read(full)
    rows = []
    for dim in [int(d) for d in args.dims.split(",")]:
        run_k = _with_dim(run, dim, args.out)
        for view in ("value", None):
            t0 = time.perf_counter()
            est, used, _, _ = estimate(run_k, claims, view=view)
            seconds = time.perf_counter() - t0
            exact = exact_rv.view(used)
            exact = exact[exact["val_set"] == "claims"].rename(columns={"val_id": "claim_id"})
            both = est.merge(exact, on=["claim_id", "doc_id"])
            for claim_id, g in both.groupby("claim_id"):
                g = g.set_index("doc_id")
                rows.append(
                    {
                        "dim": dim,
                        "view": used,
                        "claim_id": claim_id,
                        "n_docs": len(g),
                        "spearman": g["estimate"].corr(g["attribution"], method="spearman"),
                        "recall@10": _recall(g["estimate"], g["attribution"]),
                        "estimate_s": seconds,
                    }
                )
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "fidelity.csv", index=False)
    print(table.to_string(index=False))
    print(table.groupby(["dim", "view"])[["spearman", "recall@10"]].mean().to_string())


if __name__ == "__main__":
    main()
