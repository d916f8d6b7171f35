"""How long `attribution report` takes on a large synthetic run (default: 1M documents, 100 sources).

Writes a run directory with the real schema (docs, doc_values, step_values, stage_values,
example_values, val_sets, manifest) filled with synthetic values, then times `build_report` on it
(the full report: tables, bootstrap CIs, figures, per-example evidence, HTML, Markdown, CSV).

    .venv/bin/python benchmarks/report_scale.py [--docs 1000000] [--sources 100] [--owners 5000]
        [--steps 4000] [--batch 384] [--examples 4] [--bootstrap 200] [--semantic] [--workdir DIR]

Data generation is not timed. build_s is wall time, cpu_s the process's CPU time (the honest
figure on a shared machine; load_avg_1m says how shared it was). Peak memory is the maximum resident
set size of the process that builds the report (the data is generated in a child process).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def make_big_run(
    out: Path,
    n_docs: int,
    n_sources: int,
    n_owners: int,
    n_steps: int,
    batch: int,
    n_examples: int,
    seed: int = 0,
) -> None:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "val_sets").mkdir(exist_ok=True)
    ids = pd.Series(np.arange(n_docs)).map("doc-{:07d}".format)
    src_idx = rng.integers(0, n_sources, n_docs)
    own_idx = src_idx * (n_owners // n_sources) + rng.integers(0, max(n_owners // n_sources, 1), n_docs)
    sources = np.array([f"source-{k:03d}" for k in range(n_sources)], dtype=object)
    owners = np.array([f"owner-{k:05d}" for k in range(n_owners)], dtype=object)
    words = np.array(
        "the of and to in a is that for it as was with be by on not he this are or his from at "
        "which but have an they you were her she there been one all we their".split(),
        dtype=object,
    )
    w = rng.integers(0, len(words), (n_docs, 12))
    text = pd.Series([" ".join(words[r]) for r in w])
    docs = pd.DataFrame(
        {
            "doc_id": ids,
            "source": sources[src_idx],
            "owner": owners[own_idx],
            "license": "CC-BY-4.0",
            "n_tokens": rng.integers(50, 2000, n_docs),
            "n_seqs": 1,
            "text": text,
        }
    )
    docs.to_parquet(out / "docs.parquet", index=False)

    sets = {"web": n_examples, "math": n_examples}
    src_mean = rng.normal(0.2, 1.0, n_sources) * 1e-4
    # Per-step rows: each step trains `batch` random documents.
    step = np.repeat(np.arange(1, n_steps + 1), batch)
    doc = rng.integers(0, n_docs, n_steps * batch)
    frames = []
    for name in sets:
        val = src_mean[src_idx[doc]] + rng.normal(0, 1e-3, len(doc)) / np.sqrt(step)
        frames.append(
            pd.DataFrame(
                {
                    "step": step,
                    "doc_id": ids.to_numpy()[doc],
                    "val_set": name,
                    "value": val,
                    "value_normalized": val * 10,
                }
            )
        )
    steps = pd.concat(frames, ignore_index=True)
    steps.to_parquet(out / "step_values.parquet", index=False)

    agg = steps.groupby(["val_set", "doc_id"], sort=False).agg(
        value=("value", "sum"), n_seen=("step", "size"), first_step=("step", "min"), last_step=("step", "max")
    )
    agg = agg.reset_index()
    full = pd.MultiIndex.from_product([list(sets), ids], names=["val_set", "doc_id"])
    dv = agg.set_index(["val_set", "doc_id"]).reindex(full).reset_index()
    dv["value"] = dv["value"].fillna(0.0)
    dv["n_seen"] = dv["n_seen"].fillna(0).astype("int64")
    dv["value_normalized"] = dv["value"] * 10
    dv["source"] = np.tile(docs.source.to_numpy(), len(sets))
    dv["owner"] = np.tile(docs.owner.to_numpy(), len(sets))
    dv[
        [
            "doc_id",
            "source",
            "owner",
            "val_set",
            "value",
            "value_normalized",
            "n_seen",
            "first_step",
            "last_step",
        ]
    ].to_parquet(out / "doc_values.parquet", index=False)

    seen = dv[(dv.val_set == "web") & (dv.n_seen > 0)].doc_id.to_numpy()
    ex_frames = []
    for name, k in sets.items():
        for e in range(k):
            ex_frames.append(
                pa.table(
                    {
                        "doc_id": seen,
                        "val_set": [name] * len(seen),
                        "val_id": [f"{name}-{e}"] * len(seen),
                        "value": rng.normal(0, 1e-4, len(seen)),
                    }
                )
            )
        with open(out / "val_sets" / f"{name}.jsonl", "w") as fh:
            for e in range(k):
                fh.write(
                    json.dumps(
                        {"id": f"{name}-{e}", "text": " ".join(words[rng.integers(0, len(words), 40)])}
                    )
                    + "\n"
                )
    pq.write_table(pa.concat_tables(ex_frames), out / "example_values.parquet")

    window = max(n_steps // 20, 1)
    st = steps.assign(source=np.tile(sources[src_idx[doc]], len(sets)))
    st["window_start"] = (st.step - 1) // window * window + 1
    st["window_end"] = st.window_start + window - 1
    stage = st.groupby(["window_start", "window_end", "source", "val_set"], as_index=False)[
        ["value", "value_normalized"]
    ].sum()
    stage.to_parquet(out / "stage_values.parquet", index=False)
    manifest = {
        "name": "scale-synthetic",
        "preset": "synthetic",
        "seed": seed,
        "steps": n_steps,
        "order": 1,
        "optimizer": "adamw",
        "optimizer_aware": False,
        "corpus": {"spec": "synthetic", "fingerprint": "synthetic"},
        "timings": {"total_s": 0},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--sources", type=int, default=100)
    ap.add_argument("--owners", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=384)
    ap.add_argument("--examples", type=int, default=4, help="validation examples per set (2 sets)")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument(
        "--semantic", action="store_true", help="include MiniLM similarity in the evidence section"
    )
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    from attribution.report import build_report

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        run = Path(tmp) / "run"
        t = time.perf_counter()
        # Generated in a child process so this process's peak memory is the report's alone.
        child = multiprocessing.get_context("fork").Process(
            target=make_big_run,
            args=(run, args.docs, args.sources, args.owners, args.steps, args.batch, args.examples),
        )
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"data generation failed with exit code {child.exitcode}")
        gen = time.perf_counter() - t
        n_step_rows = pq.read_metadata(run / "step_values.parquet").num_rows
        n_ex_rows = pq.read_metadata(run / "example_values.parquet").num_rows
        print(
            f"generated {args.docs} docs, {n_step_rows} step rows, {n_ex_rows} example rows in {gen:.1f} s",
            file=sys.stderr,
        )
        t = time.perf_counter()
        cpu0 = time.process_time()
        res = build_report(
            run,
            Path(tmp) / "report",
            pool=10000,
            currency="USD",
            n_boot=args.bootstrap,
            semantic=args.semantic,
        )
        took = time.perf_counter() - t
        cpu = time.process_time() - cpu0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        html_mb = (Path(tmp) / "report" / "report.html").stat().st_size / 1e6
        print(
            json.dumps(
                {
                    "docs": args.docs,
                    "sources": args.sources,
                    "owners": args.owners,
                    "step_rows": n_step_rows,
                    "example_rows": n_ex_rows,
                    "bootstrap": args.bootstrap,
                    "semantic": args.semantic,
                    "build_s": round(took, 1),
                    "cpu_s": round(cpu, 1),
                    "load_avg_1m": round(os.getloadavg()[0], 1),
                    "cores": os.cpu_count(),
                    "peak_rss_mib": round(peak),
                    "html_mb": round(html_mb, 2),
                    "owner_rows": len(res.tables["owner"]),
                }
            )
        )


if __name__ == "__main__":
    main()
