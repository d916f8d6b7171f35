"""Claim replay on a finished run: wall time (1 and N workers), chain storage, and ranks of texts the run never saw.

Run it on an idle machine, after `attribution demo` (or any run with a replay chain):

    .venv/bin/python benchmarks/claim_replay.py --run runs/demo --out /tmp/claim_bench

What it does:
1. makes 8 claim texts the run never saw: for 4 trained documents (not targets of the run's own
   validation sets), a partial copy (a new framing sentence + a verbatim half) and an offline
   paraphrase;
2. replays the run for them with 1 worker and with `--workers` workers (the values must be equal);
3. trains the same run again with the 8 texts as an extra in-run validation set (same seed, same
   corpus, same other validation sets, so the same trajectory) and compares the original's rank
   under the raw value and the default view, in-run vs claim replay;
4. prints the replay chain's storage and what the same chain costs for `gpt2-small` over 100k steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd


def make_claims(run: Path, out: Path, n_docs: int = 4, seed: int = 0) -> Path:
    from attribution.corpus import Document
    from attribution.values.rundir import RunDir
    from attribution.variants.build import partial_copy, pick_targets, write_jsonl
    from attribution.variants.rewriters import OfflineRewriter

    rd = RunDir(run)
    used = {t.meta.get("target_id") for texts in rd.val_sets().values() for t in texts}
    docs = rd.table("docs.parquet", required=True)
    seen = rd.table("doc_values.parquet", required=True).query("n_seen > 0")["doc_id"]
    docs = docs[~docs["doc_id"].isin(used) & docs["doc_id"].isin(set(seen)) & (docs["n_seqs"] <= 3)]
    cands = [Document(r.doc_id, r.text, r.source, r.owner) for r in docs.itertuples()]
    targets = pick_targets(cands, n_docs, seed=seed)
    rewriter = OfflineRewriter()
    records = []
    for doc in targets:
        text, _ = partial_copy(doc, random.Random(f"{seed}:{doc.doc_id}"))
        records.append(
            {
                "id": f"{doc.doc_id}::partial",
                "text": text,
                "meta": {"variant": "partial", "target_id": doc.doc_id},
            }
        )
        records.append(
            {
                "id": f"{doc.doc_id}::paraphrase",
                "text": rewriter.rewrite(doc.text, "paraphrase", seed).text,
                "meta": {"variant": "paraphrase", "target_id": doc.doc_id},
            }
        )
    path = out / "claims.jsonl"
    write_jsonl(path, records)
    return path


def ranks(run: Path, val_set: str, texts: Path) -> pd.DataFrame:
    """Rank of each text's original among the run's trained documents, raw value and default view."""
    from attribution.values.ranks import rank_of
    from attribution.values.results import RunValues
    from attribution.values.rundir import read_val_set

    rv = RunValues.read(run)
    frame = rv.view()
    frame = frame[frame["val_set"] == val_set]
    rows = []
    for t in read_val_set(texts):
        g = frame[frame["val_id"] == t.id].reset_index(drop=True)
        target = int(np.flatnonzero(g["doc_id"].to_numpy() == t.meta["target_id"])[0])
        rows.append(
            {
                "text": t.id,
                "kind": t.meta["variant"],
                "of": len(g),
                "rank_value": rank_of(g["value"].to_numpy(), target),
                f"rank_{frame.attrs.get('view', 'view')}": rank_of(g["attribution"].to_numpy(), target),
            }
        )
    return pd.DataFrame(rows)


def gpt2_small_link_bytes() -> int:
    """Bytes of one replay link for gpt2-small: fp32 weights (tied head stored once) + AdamW's two moments."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024))
    n = sum(p.numel() for p in model.parameters())  # parameters() yields the tied weight once
    return 4 * n * 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/claim_bench"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-in-run", action="store_true", help="Do not retrain for the in-run comparison.")
    args = ap.parse_args()

    from attribution.train import chain
    from attribution.train.loop import train_and_value
    from attribution.values.manifest import Manifest
    from attribution.workflows.claim import claim, read_parent

    args.out.mkdir(parents=True, exist_ok=True)
    texts = make_claims(args.run, args.out)
    manifest = Manifest.read(args.run)
    timing = {
        "run_train_seconds": manifest.timings.train_seconds,
        "run_wall_seconds": (manifest.timings.finished or 0) - (manifest.timings.started or 0),
    }
    for workers in (1, args.workers):
        t0 = time.perf_counter()
        claim(args.run, texts, args.out / f"claim_w{workers}", workers=workers, report=False, progress=False)
        timing[f"claim_seconds_workers_{workers}"] = time.perf_counter() - t0
    a = pd.read_parquet(args.out / "claim_w1" / "example_values.parquet")
    b = pd.read_parquet(args.out / f"claim_w{args.workers}" / "example_values.parquet")
    keys = ["doc_id", "val_set", "val_id"]
    equal = a.sort_values(keys).reset_index(drop=True).equals(b.sort_values(keys).reset_index(drop=True))
    table = ranks(args.out / "claim_w1", "claims", texts).add_prefix("replay_")
    if not args.skip_in_run:
        _, cfg, _ = read_parent(args.run)
        val = {
            p.stem: str(p) for p in sorted((args.run / "val_sets").glob("*.jsonl")) if p.stem != "reference"
        }
        cfg = dataclasses.replace(
            cfg,
            out=str(args.out / "inrun"),
            val={**val, "claims": str(texts)},
            progress=False,
            per_example_max=max(cfg.per_example_max, 8),
        )
        t0 = time.perf_counter()
        train_and_value(cfg)
        timing["inrun_train_seconds"] = time.perf_counter() - t0
        table = pd.concat([table, ranks(args.out / "inrun", "claims", texts).add_prefix("inrun_")], axis=1)
    links = chain.links(args.run)
    small = gpt2_small_link_bytes()
    report = {
        "timing": timing,
        "workers_equal_sequential": bool(equal),
        "speedup": timing["claim_seconds_workers_1"] / timing[f"claim_seconds_workers_{args.workers}"],
        "chain": {
            "links": len(links),
            "bytes": chain.storage(args.run),
            "keep_every": chain.read_index(args.run)["keep_every"],
        },
        "gpt2_small": {
            "bytes_per_link": small,
            "links_100k_steps_every_1000": 101,
            "total_gb": small * 101 / 1e9,
        },
    }
    print(json.dumps(report, indent=2))
    print(table.to_string(index=False))
    table.to_csv(args.out / "ranks.csv", index=False)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
