"""Train the hand-written copyright experiment's run on a GPU, with other model sizes, and bring back
what its ranks need.

Why: on the 2-core CPU one run of `attribution experiment copyright` on the hand-written cases takes
about half an hour at `cpu-tiny`, so "is it the model's width or training that limits the ranks?"
cannot be measured there. This script re-creates the experiment's run from a finished run's manifest
(same corpus, texts, reference set and settings), with a new seed and/or model overrides, trains it
on the GPU, computes the checkpoint cosines at every `--powers` (`checkpoint_values_powers.parquet`), and packs the small files of the run
(manifest, documents, values, checkpoint tables, train log) into `OUT/NAME.tar.gz`. Unpacked into an
experiment folder here, `attribution experiment copyright ... --out FOLDER` with the same flags reuses the
run, as it reuses any finished run of exactly its config (model overrides make it a different config:
rank those with `benchmarks/checkpoint_power.py`, which reads the tables directly).

    python benchmarks/gpu_heldout.py --template .gpu/manifest.json --variants .gpu/variants \
        --name s1 --seed 1 --out $OUT [--set n_embd=256 --set n_layer=4 --set n_head=4 --set epochs=2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tarfile
import time
from pathlib import Path

KEEP = (
    "manifest.json",
    "docs.parquet",
    "doc_values.parquet",
    "example_values.parquet",
    "train_log.csv",
    "val_sets",
    "inputs",
)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    from attribution.train import RunConfig, train_and_value
    from attribution.workflows import checkpoint_similarity as cs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--template", type=Path, required=True, help="manifest.json of a finished experiment run")
    ap.add_argument("--variants", type=Path, required=True, help="the experiment's variants/ folder")
    ap.add_argument("--name", required=True)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--root", type=Path, default=Path("/tmp/hw"), help="experiment folders live here")
    ap.add_argument("--set", action="append", default=[], help="FIELD=VALUE override of the run config")
    ap.add_argument("--powers", default="0,1,2")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--val-chunk-mib",
        type=int,
        default=None,
        help="validation chunk size (values do not depend on it: tests/test_engine_valuer.py); larger on a GPU",
    )
    args = ap.parse_args()
    if args.val_chunk_mib:
        from attribution.engine import valuer

        valuer.VAL_CHUNK_BYTES = args.val_chunk_mib << 20

    config = json.loads(args.template.read_text())["config"]
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    cfg = RunConfig(**{k: v for k, v in config.items() if k in fields})
    folder = args.root / args.name
    shutil.copytree(args.variants, folder / "variants", dirs_exist_ok=True)
    changes = {
        "out": str(folder / "run-order1"),
        "val": {k: str(folder / "variants" / Path(v).name) for k, v in cfg.val.items()},
        "betas": tuple(cfg.betas),
        "exclude_ids": tuple(cfg.exclude_ids),
        "keep_ids": tuple(cfg.keep_ids),
    }
    if args.seed is not None:
        changes["seed"] = args.seed
    for item in args.set:
        key, _, value = item.partition("=")
        changes[key] = _value(value)
    if "steps" in changes:  # a number of steps replaces the template's epochs, and the other way round
        changes.setdefault("epochs", None)
    elif "epochs" in changes:
        changes.setdefault("steps", None)
    cfg = dataclasses.replace(cfg, **changes)
    t0 = time.time()
    run = Path(train_and_value(cfg))
    print(f"{args.name}: trained in {time.time() - t0:.1f} s", flush=True)
    powers = [float(p) for p in args.powers.split(",")]
    t0 = time.time()
    frame = cs.for_run(run, powers=powers)
    frame.to_parquet(run / "checkpoint_values_powers.parquet")
    if cs.POWER in powers:
        cs.write(run, frame)
    print(f"{args.name}: checkpoint cosines at powers {powers} in {time.time() - t0:.1f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.out / f"{args.name}.tar.gz", "w:gz") as tar:
        for item in sorted(run.iterdir()):
            if item.name in KEEP or item.name.startswith("checkpoint_values"):
                tar.add(item, arcname=f"{args.name}/run-order1/{item.name}")
    print(f"{args.name}: packed {args.out / (args.name + '.tar.gz')}", flush=True)


if __name__ == "__main__":
    main()
