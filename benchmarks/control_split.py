"""Where the copyright experiment's control bias sits: the other originals, split by source.

The control of `attribution experiment copyright` is the mean rank of the *other* originals for a text
(about (n + 1) / 2 for a score that does not favour documents like them). This splits it, per method,
into the other originals of the text's own source (a legal clause's variant against the other legal
clauses), the originals of other sources, and, for scale, the built-in documents of the text's source,
under the default view, the raw checkpoint cosine, the raw value, BM25 and MiniLM.

    .venv/bin/python benchmarks/control_split.py /tmp/hw/s13/run-order1 --half hw-b \
        --variants corpora/handwritten/variants_a.jsonl --variants corpora/handwritten/variants_b.jsonl

Originals are the training documents whose id starts with `hw-` (corpora/handwritten).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

VIEWS = ("standout_checkpoint", "checkpoint_cosine", "value")


def _records(paths: list[str], half: str) -> list[dict]:
    rows = [
        json.loads(line) for p in paths for line in Path(p).read_text(encoding="utf-8").splitlines() if line
    ]
    return [r for r in rows if r["meta"]["target_id"].startswith(half)]


def split(run: Path, half: str, variant_files: list[str]) -> pd.DataFrame:
    """One row per (method, text): the mean rank of each group of documents for that text."""
    import bm25s

    from attribution.embeddings import embed
    from attribution.values import RunValues
    from attribution.values.ranks import rank_of
    from attribution.values.views import column_of

    trained = set(pd.read_parquet(run / "doc_values.parquet")["doc_id"].astype(str))
    docs = pd.read_parquet(run / "docs.parquet")
    docs = docs[docs["doc_id"].astype(str).isin(trained)].reset_index(drop=True)
    ids = docs["doc_id"].astype(str).tolist()
    source = dict(zip(ids, docs["source"], strict=True))
    row = {d: i for i, d in enumerate(ids)}
    originals = [d for d in ids if d.startswith("hw-")]
    records = _records(variant_files, half)
    groups = dict(iter(RunValues.read(run).with_views().groupby(["val_set", "val_id"])))
    bm25 = bm25s.BM25(k1=1.5, b=0.75, method="lucene")  # as the experiment's baseline
    bm25.index(
        bm25s.tokenize(docs["text"].tolist(), stopwords="en", show_progress=False), show_progress=False
    )
    queries = [r["text"] for r in records]
    q_tokens = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
    doc_vecs, q_vecs = embed(docs["text"].tolist()), embed(queries)
    out = []
    for i, r in enumerate(records):
        target = r["meta"]["target_id"]
        g = groups[(r["meta"]["variant"], r["id"])]
        at = g["doc_id"].astype(str).map(row)
        ok = at.notna().to_numpy()
        scores = {"bm25": np.asarray(bm25.get_scores(q_tokens[i])), "minilm": doc_vecs @ q_vecs[i]}
        for view in VIEWS:  # a document without a row for the text scores 0, as in the experiment
            scores[view] = np.zeros(len(ids))
            scores[view][at[ok].astype(int).to_numpy()] = g[column_of(view)].to_numpy(dtype=np.float64)[ok]
        same = [row[o] for o in originals if o != target and source[o] == source[target]]
        other = [row[o] for o in originals if source[o] != source[target]]
        builtin = [row[d] for d in ids if d not in originals and source[d] == source[target]]
        for method, s in scores.items():

            def mean_rank(rows: list[int], s=s) -> float:
                return float(np.mean([rank_of(s, j) for j in rows]))

            out.append(
                {
                    "method": method,
                    "text": r["id"],
                    "control": mean_rank(same + other),
                    "same_source_originals": mean_rank(same),
                    "other_source_originals": mean_rank(other),
                    "same_source_builtin": mean_rank(builtin),
                }
            )
    table = pd.DataFrame(out)
    table.attrs["n_docs"] = len(ids)
    return table


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the experiment's run directory (OUT/run-order1)")
    ap.add_argument("--half", default="hw-b", help="originals whose id starts with this (default hw-b)")
    ap.add_argument("--variants", action="append", required=True, help="variants JSONL; repeatable")
    args = ap.parse_args(argv)
    table = split(args.run, args.half, args.variants)
    means = table.drop(columns="text").groupby("method").mean().round(1)
    n_docs = table.attrs["n_docs"]
    print(
        f"{args.run}, {args.half}*: {table['text'].nunique()} texts; chance {(n_docs + 1) / 2:g} of {n_docs}"
    )
    print(means.to_string())
    return means


if __name__ == "__main__":
    main()
