"""The checkpoint sketch index against the exact checkpoint similarity, per dimension, in one gradient pass.

    .venv/bin/python benchmarks/checkpoint_sketch_fidelity.py --run RUN --claims claims.jsonl \
        --dims 128,256,512,1024,2048
    .venv/bin/python benchmarks/checkpoint_sketch_fidelity.py --run RUN --val-set NAME --dims ...

One pass of the run's checkpoint similarity (`attribution.workflows.checkpoint_similarity.for_run`) over
every document and the texts (claims, or one of the run's own validation sets) gives the exact cosines and
the reference statistics; its sink feeds one pair of `Sketcher`s per dimension, drawn from the run's seed
as `attribution run` draws its index. So every dimension is measured on the same gradients, and the
dimension the run wrote is checked against the run's own index (the same numbers, up to float16).

Per text, view (`checkpoint_cosine`, `standout_checkpoint`) and dimension: Spearman between estimate and
exact over every document, recall@10 (the share of the exact top 10 in the sketch's top 10; also within the
top 50, what `--k 50` would confirm), and, for texts with a `meta.target_id`, the target's rank under both.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import time
from pathlib import Path

import numpy as np
import pandas as pd


def _recall(est: np.ndarray, exact: np.ndarray, k: int = 10, candidates: int = 10) -> float:
    top = set(np.argsort(-exact, kind="stable")[:k])
    return len(top & set(np.argsort(-est, kind="stable")[:candidates])) / k


def _rank(x: np.ndarray, j: int) -> float:
    return float(pd.Series(x).rank(ascending=False, method="average").iloc[j])


def _merge(sets: dict):
    """One `ValData` of several sets' texts, each id prefixed with its set's name."""
    first = next(iter(sets.values()))
    ids, masks, owners, docs, at = [], [], [], [], 0
    for name, v in sets.items():
        ids.append(v.ids)
        masks.append(v.mask)
        owners.append(v.seq_doc + at)
        docs += [dataclasses.replace(d, doc_id=f"{name}/{d.doc_id}") for d in v.docs]
        at += len(v.docs)
    return dataclasses.replace(
        first,
        name="claims",
        ids=np.concatenate(ids),
        mask=np.concatenate(masks),
        seq_doc=np.concatenate(owners),
        docs=docs,
    )


def rankings_for_the_default_view(
    est: np.ndarray, z_exact: np.ndarray, mu: np.ndarray, sd: np.ndarray, targets: list[int | None], dim: int
) -> pd.DataFrame:
    """How well each candidate ranking serves the default view (`standout_checkpoint`): the cosine
    estimate, the plain z of the estimate, and z with the spread widened by c / dim (c = 1 is the
    estimate's noise variance, the index's choice). Per ranking: recall of the exact top 10 within its top
    10 and top 50, the original's mean rank, how often the original is among its top 10, and how often it
    is then first among those candidates by the exact z (what `claim --fast` reports)."""
    rankings = {"cosine": est, "standout, plain sd": np.nan_to_num((est - mu) / sd)}
    for c in (0.25, 1.0, 4.0):
        rankings[f"standout, sd widened by {c:g}/dim"] = np.nan_to_num(
            (est - mu) / np.sqrt(sd**2 + c / (dim - 1))
        )
    rows = []
    for name, r in rankings.items():
        rec10, rec50, target, found, first = [], [], [], 0, 0
        for i in range(len(est)):
            top = set(np.argsort(-z_exact[i], kind="stable")[:10])
            order = np.argsort(-r[i], kind="stable")
            rec10.append(len(top & set(order[:10])) / 10)
            rec50.append(len(top & set(order[:50])) / 10)
            j = targets[i]
            if j is None:
                continue
            target.append(_rank(r[i], j))
            cand = list(order[:10])
            if j in cand:
                found += 1
                first += int(_rank(z_exact[i][cand], cand.index(j)) == 1)
        rows.append(
            {
                "dim": dim,
                "ranking": name,
                "recall10": np.mean(rec10),
                "recall10_in50": np.mean(rec50),
                "target_rank": np.mean(target) if target else np.nan,
                "target_in_top10": found,
                "then_first_by_exact": first,
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    from attribution.corpus import read_validation
    from attribution.train import chain, loop
    from attribution.values.manifest import Manifest
    from attribution.values.views import REFERENCE_SET, VIEWS
    from attribution.workflows import checkpoint_similarity as cs
    from attribution.workflows import checkpoint_sketch as ck
    from attribution.workflows.claim_fast import _config, parent_data

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a finished run with a replay chain")
    ap.add_argument("--claims", type=Path, default=None, help="JSONL texts the run never saw")
    ap.add_argument("--val-set", default=None, help="or: the run's per-example validation sets (a glob)")
    ap.add_argument("--dims", default="128,256,512,1024,2048", help="index dimensions, comma separated")
    ap.add_argument("--csv", type=Path, default=None, help="write the per-text rows here")
    ap.add_argument("--npz", type=Path, default=None, help="write the exact and estimated scores here")
    ap.add_argument(
        "--groups",
        default="*",
        help="report texts in groups: comma-separated globs over their ids (e.g. '*hw-a-*,*hw-b-*')",
    )
    args = ap.parse_args()
    if (args.claims is None) == (args.val_set is None):
        raise SystemExit("give exactly one of --claims and --val-set")
    manifest = Manifest.read(args.run)
    cfg = _config(manifest)
    if args.val_set:  # the run's own sets, as one text set (a text keeps its set's name in its id)
        val = parent_data(args.run, cfg)[0]
        names = [n for n in val if fnmatch.fnmatch(n, args.val_set) and val[n].per_example]
        if not names:
            raise SystemExit(f"{args.run}: no per-example validation set matches {args.val_set!r}")
        paths = {n: val[n].path for n in names}
    else:
        paths = {"claims": str(args.claims)}
    sets = loop.load_validation(dataclasses.replace(cfg, val=paths))
    texts = _merge(sets)
    meta = {f"{n}/{t.doc_id}": dict(t.meta or {}) for n, p in paths.items() for t in read_validation(p)}
    dims = [int(d) for d in args.dims.split(",")]
    n_links = len(chain.links(args.run))
    sinks = {d: {k: ck.Sketcher(k, d, n_links, cfg.seed) for k in ("doc", "text")} for d in dims}

    spent = dict.fromkeys(dims, 0.0)  # seconds in each dimension's sketching, inside the one pass

    def fan(*a):
        for d, pair in sinks.items():
            t = time.perf_counter()
            for s in pair.values():
                s(*a)
            spent[d] += time.perf_counter() - t

    t0 = time.perf_counter()
    frame = cs.for_run(args.run, {"claims": texts}, sink=fan, progress=True)
    wall = time.perf_counter() - t0
    bare = wall - sum(spent.values())
    print(f"one checkpoint pass ({n_links} links, {len(dims)} dimensions sketched): {wall:.1f} s")
    for d, sec in spent.items():
        print(f"  sketching at dim {d}: {sec:.1f} s = {sec / bare:.1%} of the pass without sketches")
    col = cs.power_column(cs.POWER)
    docs = list(pd.unique(frame["doc_id"]))
    n_claims = len(texts.example_ids)
    exact = frame[frame["val_set"] == "claims"][col].to_numpy().reshape(n_claims, len(docs))
    z_frame = frame.rename(columns={col: "checkpoint_cosine"})
    z_exact = VIEWS["standout_checkpoint"].fn(z_frame, pd.DataFrame())
    z_exact = z_exact[(frame["val_set"] == "claims").to_numpy()].to_numpy().reshape(n_claims, len(docs))
    ref = frame[frame["val_set"] == REFERENCE_SET]
    mu, sd = ck.reference_stats(ref, docs, cs.POWER)  # the index's own statistics
    # documents the run trained (a gradient, so a vector): the exact views and the index hold only these
    keep = np.abs(sinks[dims[0]]["doc"].vectors).sum(axis=1) > 0
    docs, exact, z_exact, mu, sd = (
        [d for d, k in zip(docs, keep, strict=True) if k],
        exact[:, keep],
        z_exact[:, keep],
        mu[keep],
        sd[keep],
    )
    for pair in sinks.values():
        pair["doc"].vectors = pair["doc"].vectors[keep]

    if cfg.sketch_dim in sinks and (args.run / ck.FOLDER).is_dir():  # the run's own index: same numbers
        stored = ck.read(args.run).vectors("raw")
        mine = sinks[cfg.sketch_dim]["doc"].vectors
        print(
            f"dim {cfg.sketch_dim}: largest difference from the run's index {np.abs(stored - mine).max():.2e} "
            f"(entries up to {np.abs(mine).max():.2e}; float16 storage)"
        )

    globs = args.groups.split(",")
    group = np.asarray(
        [next((g for g in globs if fnmatch.fnmatch(str(c), g)), "") for c in texts.example_ids], dtype=object
    )
    rows, candidates = [], []
    for d, pair in sinks.items():
        est = pair["text"].vectors[:n_claims] @ pair["doc"].vectors.T
        z_est = np.nan_to_num((est - mu) / np.sqrt(sd**2 + ck.NOISE / (d - 1)))  # the index's widened z
        targets = [
            docs.index(t) if (t := meta.get(str(c), {}).get("target_id")) in docs else None
            for c in texts.example_ids
        ]
        for g in globs:
            at = np.flatnonzero(group == g)
            if len(at):
                part = rankings_for_the_default_view(
                    est[at], z_exact[at], mu, sd, [targets[i] for i in at], d
                )
                candidates.append(part.assign(group=g, texts=len(at)))
        for i, cid in enumerate(texts.example_ids):
            target = meta.get(str(cid), {}).get("target_id")
            j = docs.index(target) if target in docs else None
            for view, e, x in (
                ("checkpoint_cosine", est[i], exact[i]),
                ("standout_checkpoint", z_est[i], z_exact[i]),
            ):
                rows.append(
                    {
                        "dim": d,
                        "view": view,
                        "text": cid,
                        "group": group[i],
                        "kind": meta.get(str(cid), {}).get("variant", ""),
                        "spearman": pd.Series(e).corr(pd.Series(x), method="spearman"),
                        "recall10": _recall(e, x),
                        "recall10_in50": _recall(e, x, candidates=50),
                        "target_sketch": _rank(e, j) if j is not None else np.nan,
                        "target_exact": _rank(x, j) if j is not None else np.nan,
                    }
                )
    if args.npz:
        np.savez(
            args.npz,
            exact=exact,
            z_exact=z_exact,
            mu=mu,
            sd=sd,
            docs=np.asarray(docs, dtype=str),
            texts=np.asarray(texts.example_ids, dtype=str),
            targets=np.asarray([meta.get(str(c), {}).get("target_id") or "" for c in texts.example_ids]),
            **{
                f"est_{d}": pair["text"].vectors[:n_claims] @ pair["doc"].vectors.T
                for d, pair in sinks.items()
            },
        )
    table = pd.DataFrame(rows)
    if args.csv:
        table.to_csv(args.csv, index=False)
    summary = (
        table[table["group"] != ""]
        .groupby(["group", "view", "dim"])
        .agg(
            texts=("text", "size"),
            spearman=("spearman", "mean"),
            recall10=("recall10", "mean"),
            recall10_in50=("recall10_in50", "mean"),
            target_sketch=("target_sketch", "mean"),
            target_exact=("target_exact", "mean"),
            top1_sketch=("target_sketch", lambda r: int((r == 1).sum())),
        )
    )
    print(f"{n_claims} texts, {len(docs)} documents")
    print(summary.round(3).to_string())
    kinds = table[(table["group"] != "") & (table["kind"] != "") & (table["view"] == "standout_checkpoint")]
    if len(kinds):
        print("\nthe original's mean rank by variant kind, standout_checkpoint (sketch / exact):")
        by = kinds.groupby(["group", "kind", "dim"])[["target_sketch", "target_exact"]].mean()
        print(by.round(2).unstack("dim").to_string())
    print("\ncandidate rankings for the default view (standout_checkpoint):")
    print(pd.concat(candidates).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
