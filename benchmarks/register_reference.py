"""Issue 13's last measured lever: reference texts in the claims' register.

The control of the copyright experiment (where the *other* originals rank for a text; chance (n + 1) / 2)
sits at about 41 of 100.5 under the default view, `standout_checkpoint`, on the hand-written cases.
`benchmarks/control_split.py` traced the part that the view adds (other-source originals at 42-47 under
the view, 57-65 under the raw checkpoint cosine) to its standout step: z against the run's reference
set, which is drawn from the built-in corpus, so no reference text is in the hand-written register and
any hand-written text makes an original "stand out".

This measures the lever without retraining: it computes the checkpoint cosines of a finished run's
documents with reference texts written in that register (`corpora/handwritten/reference.jsonl`, none an
original or a variant of one), with the same code and at the same kept checkpoints as the run's own
(`checkpoint_similarity.for_run`; cached next to the run), and ranks every original under
`standout_checkpoint` with three references:
- `run`: the run's own reference (sampled from the corpus; reproduces the experiment's ranks);
- `run+register`: the run's reference and the register texts;
- `register`: the register texts alone.

The view is the product's own (`views.VIEWS`), so since session 18 a reference of more than
`views.NEAREST_REFERENCE` texts (36) compares each text with the 36 nearest it, as a run does; session 17's
figures for 48 texts were made against all of them. The raw checkpoint cosine (which no reference touches)
is shown for scale. Both halves are printed; the
tuning half (hw-a) decides, the other half (hw-b) is a report.

    .venv/bin/python benchmarks/register_reference.py /tmp/hw/s13 --texts corpora/handwritten/reference.jsonl
    .venv/bin/python benchmarks/register_reference.py /tmp/hw/s13 --texts corpora/handwritten/reference.jsonl \
        --texts corpora/handwritten/reference2.jsonl     # 32 register texts (session 17)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

KINDS = ("partial", "paraphrase", "significant", "similar")
REFERENCES = ("run", "run+register", "register")


def register_cosines(run: Path, texts: Path, folder: Path) -> pd.DataFrame:
    """`doc_id, val_id, checkpoint_cosine` of every run document with every register text, cached in
    `folder` under the file's content hash (another file, or an edited one, is computed afresh)."""
    digest = hashlib.sha256(texts.read_bytes()).hexdigest()[:16]
    cache = folder / f"register_cosines.{digest}.parquet"
    if cache.is_file():
        return pd.read_parquet(cache)
    from attribution.train import loop
    from attribution.train.config import RunConfig
    from attribution.values.rundir import RunDir
    from attribution.workflows import checkpoint_similarity as cs

    cfg = RunConfig.of_run(RunDir(run).manifest().config)
    val = loop.load_validation(dataclasses.replace(cfg, val={"register": str(texts)}))
    frame = cs.for_run(run, val, reference=False, progress=True)
    out = frame[["doc_id", "val_id"]].assign(checkpoint_cosine=frame[cs.power_column(cs.POWER)])
    out.to_parquet(cache, index=False)
    return out


def with_reference(cos: pd.DataFrame, register: pd.DataFrame, which: str) -> pd.DataFrame:
    """The run's checkpoint cosines with the reference rows `which` names under val_set "reference"."""
    from attribution.values.views import REFERENCE_SET

    reg = register.assign(val_set=REFERENCE_SET)
    if which == "run":
        return cos
    if which == "run+register":
        return pd.concat([cos, reg], ignore_index=True)
    own = cos["val_set"] == REFERENCE_SET
    return pd.concat(
        [cos.assign(val_set=cos["val_set"].where(~own, "run_reference")), reg], ignore_index=True
    )


def ranks(
    frame: pd.DataFrame, column: str, records: list[dict], train_ids: list[str], source_of: dict[str, str]
) -> pd.DataFrame:
    """Per record: the original's rank and the other originals' mean rank, split by their source
    (`source_of`: every original's id -> its source)."""
    from attribution.values.ranks import rank_and_control, rank_of

    row = {d: i for i, d in enumerate(train_ids)}
    originals = sorted(source_of)
    groups = dict(iter(frame.groupby(["val_set", "val_id"])))
    out = []
    for r in records:
        target = r["meta"]["target_id"]
        g = groups[(r["meta"]["variant"], r["id"])]
        at = g["doc_id"].astype(str).map(row)
        ok = at.notna().to_numpy()
        scores = np.zeros(len(train_ids))
        scores[at[ok].astype(int).to_numpy()] = g[column].to_numpy(dtype=np.float64)[ok]
        same = [row[o] for o in originals if o != target and source_of[o] == source_of[target]]
        other = [row[o] for o in originals if source_of[o] != source_of[target]]
        rank, control = rank_and_control(scores, row[target], same + other)
        out.append(
            {
                "half": target[:4],
                "kind": r["meta"]["variant"],
                "rank": rank,
                "control": control,
                "same_source": float(np.mean([rank_of(scores, j) for j in same])),
                "other_source": float(np.mean([rank_of(scores, j) for j in other])),
            }
        )
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", type=Path, help="an `attribution experiment copyright` output folder")
    ap.add_argument(
        "--texts",
        type=Path,
        action="append",
        required=True,
        help="reference texts in the register (corpus JSONL); repeat to join files into one register set",
    )
    args = ap.parse_args(argv)
    from attribution.values.views import VIEWS

    exp = json.loads((args.experiment / "experiment.json").read_text())
    run = Path(exp["runs"]["1"])
    records = [
        json.loads(line)
        for p in exp["handwritten"]["variants"]
        for line in Path(p).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    source_of = {
        meta["id"]: meta["pile_set_name"]
        for p in exp["handwritten"]["originals"]
        for meta in (
            json.loads(x)["meta"] for x in Path(p).read_text(encoding="utf-8").splitlines() if x.strip()
        )
    }
    trained = pd.read_parquet(run / "doc_values.parquet", columns=["doc_id"])["doc_id"].astype(str)
    docs = pd.read_parquet(run / "docs.parquet")
    train_ids = [d for d in docs["doc_id"].astype(str) if d in set(trained)]
    cos = pd.read_parquet(run / "checkpoint_values.parquet")
    parts = [register_cosines(run, t, args.experiment) for t in args.texts]
    ids = [set(p["val_id"]) for p in parts]
    if sum(map(len, ids)) != len(set().union(*ids)):
        raise SystemExit("register texts: an id appears in two --texts files")
    register = pd.concat(parts, ignore_index=True)
    tables = []
    for which in REFERENCES:
        frame = with_reference(cos, register, which)
        frame = frame.assign(z=VIEWS["standout_checkpoint"].fn(frame, docs).to_numpy())
        tables.append(
            ranks(frame, "z", records, train_ids, source_of).assign(method=f"standout_checkpoint, {which}")
        )
    tables.append(
        ranks(cos, "checkpoint_cosine", records, train_ids, source_of).assign(method="checkpoint_cosine")
    )
    table = pd.concat(tables, ignore_index=True)
    n = len(train_ids)
    for half in ("hw-a", "hw-b"):
        t = table[table["half"] == half]
        kinds = t.pivot_table(index="method", columns="kind", values="rank", aggfunc="mean")[list(KINDS)]
        summary = kinds.assign(
            mean=kinds.mean(axis=1),
            control=t.groupby("method")["control"].mean(),
            same_source=t.groupby("method")["same_source"].mean(),
            other_source=t.groupby("method")["other_source"].mean(),
        ).round(2)
        label = "tuning" if half == "hw-a" else "report"
        print(f"\n{half}* ({label}); {n} training documents, chance {(n + 1) / 2:g}\n")
        print(summary.to_string())
    return table


if __name__ == "__main__":
    main()
