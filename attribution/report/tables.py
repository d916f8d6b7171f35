"""Per-document values, per-source / per-owner tables, and bootstrap confidence intervals.

Group figures are sums over documents (never values computed for a group as a whole), so an
owner's total is invariant to how its documents are labelled. All heavy work is vectorized:
pandas groupby for the tables, sparse matrix products for the bootstrap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from tqdm.auto import tqdm

from attribution.errors import UserError
from attribution.report.royalty import Rule, split_pool
from attribution.report.rundata import Run

COLUMNS = [
    "n_docs",
    "n_tokens",
    "value",
    "value_per_token",
    "share",
    "royalty",
    "neg_fraction",
    "ci_low",
    "ci_high",
]
CI_LEVEL = 0.95


@dataclass
class DocValues:
    """Documents with their value summed over the chosen validation sets (mean over runs)."""

    docs: pd.DataFrame  # doc_id, source, owner, n_tokens, value, n_seen
    per_run: np.ndarray  # [n_runs, n_docs] values of each run, same doc order


def _arrow_strings(x: pd.Series | pd.Index) -> pa.Array | pa.ChunkedArray:
    arr = pa.array(pd.Series(x, copy=False))  # zero-copy for Arrow-backed string columns
    return arr if pa.types.is_string(arr.type) else pc.cast(arr, pa.string())


def positions(ids: pd.Series | pd.Index, universe: pd.Series | pd.Index) -> np.ndarray:
    """Row of each id in `universe` (-1 if absent), hashed in Arrow: fast for millions of string ids."""
    found = pc.index_in(_arrow_strings(ids), value_set=_arrow_strings(universe))
    return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def doc_values(runs: Sequence[Run], val_sets: Sequence[str]) -> DocValues:
    """Sum each document's raw additive `value` over `val_sets`; average runs (seeds) document-wise.

    A document a run never valued (never in a batch) counts as 0 for that run.
    """
    docs = pd.concat([r.docs for r in runs]) if len(runs) > 1 else runs[0].docs
    docs = docs.drop_duplicates("doc_id", keep="first").reset_index(drop=True)
    n = len(docs)
    per_run = np.zeros((len(runs), n))
    n_seen = np.zeros(n)
    for k, run in enumerate(runs):
        dv = run.doc_values[run.doc_values.val_set.isin(val_sets)]
        pos = positions(dv.doc_id, docs.doc_id)
        if (pos < 0).any():
            raise UserError(f"{run.path}: doc_values.parquet names documents that docs.parquet lacks")
        per_run[k] = np.bincount(pos, weights=dv.value.to_numpy(dtype=np.float64), minlength=n)
        if "n_seen" in dv:  # the same for every validation set: count it once per run
            seen = np.zeros(n)
            np.maximum.at(seen, pos, dv.n_seen.fillna(0).to_numpy(dtype=np.float64))
            n_seen += seen
    docs = docs.assign(value=per_run.mean(axis=0), n_seen=n_seen / len(runs))
    return DocValues(docs=docs, per_run=per_run)


def group_codes(docs: pd.DataFrame, by: str) -> tuple[np.ndarray, list[str]]:
    codes, names = pd.factorize(docs[by], sort=True)
    return codes, [str(n) for n in names]


def _replicate_group_shares(make_values, n_boot: int, rule: Rule, group_code_list, chunk: int, desc: str):
    """Apply `rule` to replicate document values and sum shares per group, chunk by chunk.

    `make_values(start, stop)` returns a fresh [n_docs, b] array (documents on axis 0), which the
    rule may overwrite. All groupings and the total weight come out of one sparse product (one pass
    over the large array); dividing group weight by total weight equals summing document shares.
    """
    sizes = [int(c.max()) + 1 for c in group_code_list]
    n_docs = len(group_code_list[0])
    rows = np.concatenate(
        [c + off for c, off in zip(group_code_list, np.cumsum([0] + sizes[:-1]), strict=True)]
        + [np.full(n_docs, sum(sizes))]
    )
    cols = np.tile(np.arange(n_docs), len(sizes) + 1)
    stacked = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(sum(sizes) + 1, n_docs))
    outs = [np.empty((n_boot, k)) for k in sizes]
    for start in tqdm(range(0, n_boot, chunk), desc=desc, unit="chunk", leave=False, disable=None):
        stop = min(start + chunk, n_boot)
        sums = stacked @ rule.weights(make_values(start, stop), 0)  # [groups... + total, b]
        total = sums[-1]
        total = np.where(total > 0, total, np.nan)  # a replicate with nothing to share
        off = 0
        for out, k in zip(outs, sizes, strict=True):
            out[start:stop] = (sums[off : off + k] / total).T
            off += k
    return outs


def bootstrap_steps(
    step_values: pd.DataFrame,
    dv: DocValues,
    rule: Rule,
    group_code_list,
    *,
    n_boot: int = 200,
    seed: int = 0,
    chunk: int = 25,
) -> list[np.ndarray]:
    """Replicate group shares from resampling training steps with replacement.

    Each replicate reweights every step by its multinomial count c_s and perturbs the point values:
    v* = v + sum_s (c_s - 1) x_s. When the document values are the sums of the step values (the
    usual case) this is exactly the classic bootstrap sum; documents without step rows stay fixed.
    """
    d = positions(step_values.doc_id, dv.docs.doc_id)
    keep = d >= 0
    steps, s_codes = np.unique(step_values.step.to_numpy()[keep], return_inverse=True)
    x = step_values.value.to_numpy(dtype=np.float64)[keep]
    mt = sp.csr_matrix((x, (d[keep], s_codes)), shape=(len(dv.docs), len(steps)))  # sums duplicates
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(steps), np.full(len(steps), 1.0 / len(steps)), size=n_boot).astype(
        np.float64
    )
    delta = np.ascontiguousarray((counts - 1.0).T)  # [n_steps, n_boot]
    base = dv.docs.value.to_numpy()[:, None]

    def make(start: int, stop: int) -> np.ndarray:
        v = mt @ np.ascontiguousarray(delta[:, start:stop])
        v += base
        return v

    return _replicate_group_shares(make, n_boot, rule, group_code_list, chunk, "bootstrap over steps")


def bootstrap_seeds(
    dv: DocValues, rule: Rule, group_code_list, *, n_boot: int = 200, seed: int = 0, chunk: int = 25
) -> list[np.ndarray]:
    """Replicate group shares from resampling whole runs (seeds) with replacement."""
    n_runs = dv.per_run.shape[0]
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_runs, np.full(n_runs, 1.0 / n_runs), size=n_boot) / n_runs

    def make(start: int, stop: int) -> np.ndarray:
        return dv.per_run.T @ weights[start:stop].T

    return _replicate_group_shares(make, n_boot, rule, group_code_list, chunk, "bootstrap over seeds")


def ci_bounds(replicates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of each group's replicate shares (replicates with nothing to share dropped)."""
    alpha = (1 - CI_LEVEL) / 2 * 100
    pct = np.nanpercentile if np.isnan(replicates).any() else np.percentile  # nanpercentile is slow
    with np.errstate(all="ignore"):
        lo, hi = pct(replicates, [alpha, 100 - alpha], axis=0)
    return lo, hi


def doc_shares(dv: DocValues, rule: Rule) -> np.ndarray:
    """Point shares per document; UserError when the rule has nothing to distribute."""
    shares = rule.shares(dv.docs.value.to_numpy())
    if np.isnan(shares).any():
        raise UserError(
            f"royalty rule {rule.name!r} has nothing to distribute: "
            + (
                "no document has a positive value"
                if not rule.allows_negative
                else "the total value is not positive"
            )
            + " on the chosen validation set(s)"
        )
    return shares


def group_table(
    dv: DocValues,
    shares: np.ndarray,
    by: str,
    codes: np.ndarray,
    names: list[str],
    pool: Decimal,
    ci: tuple[np.ndarray, np.ndarray] | None,
    per_run_shares: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per group with the report's columns, sorted by share (then name) for stable output."""
    docs = dv.docs
    frame = pd.DataFrame(
        {
            "g": codes,
            "n_tokens": docs.n_tokens.to_numpy(dtype=np.int64),
            "value": docs.value.to_numpy(),
            "share": shares,
            "neg": (docs.value.to_numpy() < 0).astype(np.int64),
        }
    )
    agg = frame.groupby("g").agg(
        n_docs=("value", "size"),
        n_tokens=("n_tokens", "sum"),
        value=("value", "sum"),
        share=("share", "sum"),
        neg=("neg", "sum"),
    )
    agg = agg.reindex(range(len(names)), fill_value=0)
    out = pd.DataFrame({by: names})
    out["n_docs"] = agg.n_docs.to_numpy()
    out["n_tokens"] = agg.n_tokens.to_numpy()
    out["value"] = agg.value.to_numpy()
    with np.errstate(all="ignore"):
        out["value_per_token"] = np.where(out.n_tokens > 0, out.value / out.n_tokens.clip(lower=1), 0.0)
        out["neg_fraction"] = agg.neg.to_numpy() / out.n_docs.clip(lower=1)
    out["share"] = agg.share.to_numpy()
    out["ci_low"] = ci[0] if ci is not None else np.nan
    out["ci_high"] = ci[1] if ci is not None else np.nan
    if per_run_shares is not None:
        out["share_seed_sd"] = per_run_shares.std(axis=0, ddof=1)
    out = out.sort_values(["share", by], ascending=[False, True], kind="mergesort").reset_index(drop=True)
    out["royalty"] = split_pool(out.share.to_numpy(), pool)
    cols = [by] + COLUMNS + (["share_seed_sd"] if per_run_shares is not None else [])
    return out[cols]


def format_table(table: pd.DataFrame) -> list[dict[str, str]]:
    """Every number as the one string the CSV, HTML and Markdown all print (fixed formats)."""
    rows = []
    for rec in table.to_dict("records"):
        row = {}
        for k, v in rec.items():
            row[k] = fmt(k, v)
        rows.append(row)
    return rows


def fmt(column: str, v) -> str:
    if isinstance(v, Decimal):
        return f"{v:.2f}"
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if column in ("n_docs", "n_tokens"):
        return str(int(v))
    spec = {
        "share": ".6f",
        "ci_low": ".6f",
        "ci_high": ".6f",
        "share_seed_sd": ".6f",
        "neg_fraction": ".4f",
    }.get(column, ".6g")
    text = format(float(v), spec)
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # never print "-0"
