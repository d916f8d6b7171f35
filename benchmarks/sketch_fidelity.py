"""Fast claims (sketch index) against exact values: Spearman over all documents, recall@10, originals' ranks.

Small by default (a test-micro run on a generated corpus, about a minute on 2 cores). On a real run:

    # texts the run never saw: exact values from one full replay of RUN (`attribution claim`)
    .venv/bin/python benchmarks/sketch_fidelity.py --run runs/demo --claims claims.jsonl \
        --dims 64,128,256 --out /tmp/sketch_fidelity
    # one of the run's own validation sets: its in-run values are the exact values (no replay)
    .venv/bin/python benchmarks/sketch_fidelity.py --run runs/demo --val-set rewrites --dims 64,128,256

A dimension at most the run's own `--sketch-dim` is read from the run's index as a prefix
(`attribution.train.sketch.prefix`: exactly the index a run with that dimension writes); a larger one
trains the run again with that `--sketch-dim` (same seed, corpus and settings, so the same trajectory and
values) into `--out/dim_K`. Train once at the largest dimension to measure every smaller one. Per claim,
view (raw value and the run's default view) and dimension: Spearman between estimate and exact value over
every trained document, recall@10 (the share of the exact top 10 in the sketch's top 10) and, for texts
with a `meta.target_id`, the target's rank under both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

CANDIDATES = (20, 50, 100)  # candidate-list sizes: how many the exact replay would have to confirm


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
    """RUN's sketch at dimension `dim`: a prefix of its own index when `dim` is not larger, else a retrain."""
    from attribution.train.loop import train_and_value
    from attribution.train.sketch import read_sketch
    from attribution.values.manifest import Manifest
    from attribution.workflows.claim_fast import _config

    cfg = _config(Manifest.read(run))
    if cfg.sketch_dim == dim:
        return run
    target = out / f"dim_{dim}"
    source = target / "made_from.txt"  # a cached dimension is reused only for the run it was made from
    if (target / "sketch" / "meta.json").is_file() and source.is_file():
        if source.read_text(encoding="utf-8") == str(run.resolve()):
            return target
    if target.exists():
        shutil.rmtree(target)
    if dim > cfg.sketch_dim:
        made = train_and_value(dataclasses.replace(cfg, sketch_dim=dim, out=str(target)))
    else:
        made = _prefix_run(run, read_sketch(run), dim, target)
    source.write_text(str(run.resolve()), encoding="utf-8")
    return made


def _prefix_run(run: Path, sketch, dim: int, target: Path) -> Path:
    """A run directory that is RUN (symlinked) but for its sketch, cut to `dim` by `sketch.prefix`."""
    from attribution.train.sketch import INDEX, META, SKETCH_DIR, UNIT_INDEX, prefix, write_index

    target.mkdir(parents=True, exist_ok=True)
    for entry in run.iterdir():
        if entry.name not in (SKETCH_DIR, "manifest.json") and not (target / entry.name).exists():
            (target / entry.name).symlink_to(entry.resolve())
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    manifest["config"]["sketch_dim"] = dim
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    raw = prefix(sketch.vectors("raw"), dim)
    folder = target / SKETCH_DIR
    meta = dict(sketch.meta, dim=dim)
    meta["scale"] = {
        "raw": write_index(folder / INDEX, raw),
        "unit": write_index(folder / UNIT_INDEX, raw / np.linalg.norm(raw, axis=1, keepdims=True)),
    }
    (folder / META).write_text(json.dumps(meta), encoding="utf-8")
    return target


def _recall(est: pd.Series, exact: pd.Series, k: int = 10, candidates: int | None = None) -> float:
    """Share of the exact top `k` among the sketch's top `candidates` (default `k`: recall@k)."""
    top = set(exact.nlargest(k).index)
    return len(top & set(est.nlargest(candidates or k).index)) / max(1, len(top))


def _target_rank(g: pd.DataFrame, column: str, target: str | None) -> float:
    """Rank (1 = top, ties averaged) of the claim's target document under `column`; NaN without one."""
    if not target or target not in g.index:
        return float("nan")
    return float(g[column].rank(ascending=False, method="average")[target])


def _exact(args, run: Path) -> tuple[Path, pd.DataFrame, str, dict[str, dict]]:
    """(claims file, exact per-example values, their validation-set name, claim id -> meta)."""
    from attribution.corpus import read_validation
    from attribution.values.results import RunValues
    from attribution.values.rundir import RunDir
    from attribution.workflows.claim import claim

    if args.val_set:
        paths = RunDir(run).val_set_paths()
        if args.val_set not in paths:
            raise SystemExit(f"{run}: no validation set {args.val_set!r} (has: {', '.join(paths)})")
        claims, exact_run, name = paths[args.val_set], run, args.val_set
    else:
        claims, exact_run, name = args.claims, args.out / "full", "claims"
        if not (exact_run / "manifest.json").is_file():
            t0 = time.perf_counter()
            claim(run, claims, exact_run, workers=args.workers, report=False)
            print(f"full exact replay: {time.perf_counter() - t0:.1f} s")
    meta = {str(t.doc_id): dict(t.meta or {}) for t in read_validation(claims)}
    return claims, RunValues.read(exact_run), name, meta


def main() -> None:
    from attribution.workflows.claim_fast import estimate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--run", type=Path, default=None, help="a finished run with a replay chain (default: a tiny one)"
    )
    ap.add_argument(
        "--claims", type=Path, default=None, help="JSONL claim texts (exact values by full replay)"
    )
    ap.add_argument("--val-set", default=None, help="or: one of the run's validation sets (exact = in-run)")
    ap.add_argument("--dims", default="32,256", help="sketch dimensions, comma separated")
    ap.add_argument("--views", default="value,default", help="views to rank by ('default' = the run's)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/sketch_fidelity"))
    ap.add_argument("--workers", type=int, default=1, help="processes for the full exact replay")
    args = ap.parse_args()
    if args.run is None:
        args.run, args.claims = _tiny_run(args.out / "tiny")
    if (args.claims is None) == (args.val_set is None):
        raise SystemExit("give exactly one of --claims and --val-set with --run")
    claims, exact_rv, set_name, meta = _exact(args, args.run)
    rows = []
    for dim in [int(d) for d in args.dims.split(",")]:
        run_k = _with_dim(args.run, dim, args.out)
        for view in [None if v == "default" else v for v in args.views.split(",")]:
            t0 = time.perf_counter()
            est, used, _, _ = estimate(run_k, claims, view=view)
            seconds = time.perf_counter() - t0
            exact = exact_rv.view(used)
            exact = exact[exact["val_set"] == set_name].rename(columns={"val_id": "claim_id"})
            both = est.merge(exact, on=["claim_id", "doc_id"])
            for claim_id, g in both.groupby("claim_id"):
                g = g.set_index("doc_id")
                m = meta.get(str(claim_id), {})
                target = m.get("target_id")
                rows.append(
                    {
                        "dim": dim,
                        "view": used,
                        "claim_id": claim_id,
                        "kind": m.get("variant", ""),
                        "n_docs": len(g),
                        "spearman": g["estimate"].corr(g["attribution"], method="spearman"),
                        "recall@10": _recall(g["estimate"], g["attribution"]),
                        **{
                            f"top10_in_{c}": _recall(g["estimate"], g["attribution"], 10, c)
                            for c in CANDIDATES
                        },
                        "target_rank_sketch": _target_rank(g, "estimate", target),
                        "target_rank_exact": _target_rank(g, "attribution", target),
                        "estimate_s": seconds,
                    }
                )
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "fidelity.csv", index=False)
    print(table.to_string(index=False))
    cols = [
        "spearman",
        "recall@10",
        *(f"top10_in_{c}" for c in CANDIDATES),
        "target_rank_sketch",
        "target_rank_exact",
    ]
    print(table.groupby(["view", "dim"])[cols].mean().to_string())
    if table["kind"].astype(bool).any():
        print(table.groupby(["view", "kind", "dim"])[cols].mean().to_string())


if __name__ == "__main__":
    main()
