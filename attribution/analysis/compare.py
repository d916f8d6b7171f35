"""`attribution compare`: Shapley rankings from a run beside lexical, semantic and BM25 rankings.

For every validation example of the run, the top-k training documents of each method are pooled;
each pooled (example, document) pair gets its rank under every method, exact overlap measures and
a label:

- `verbatim`: high word n-gram overlap (containment either way, or a long common span);
- `paraphrastic`: not verbatim, but high semantic similarity;
- `non-obvious influence`: among the example's top-k by Shapley value with a positive value, low on
  both n-gram overlap and semantic similarity, and standing out from the run's fixed reference set
  (`standout_z`, `attribution.values.views.standout`, at least `influence_z`): influence on *this*
  text that a copy detector would not find, not a document that helps every text;
- `none`: anything else.

The reference set's own examples are not compared (they are what the others are measured against).
A run without a reference set (or with fewer than `MIN_REFERENCE` examples in it) cannot test
standout: its label keeps the rule without it, with a warning.

Rank correlations (Spearman, Kendall) are computed per example over the pooled documents, between
the Shapley value and each method's score (exact containment, cosine, BM25), so every method is
scored on the same documents.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from attribution.analysis.index import Indexes
from attribution.analysis.overlap import longest_common_span, word_spans
from attribution.errors import UserError
from attribution.io import atomic_path, atomic_write
from attribution.text import containment
from attribution.values import RunDir, RunValues
from attribution.values.manifest import ATTRIBUTION_COLUMN
from attribution.values.views import (
    MIN_REFERENCE,
    NEAREST_REFERENCE,
    POOLED_SCALE,
    REFERENCE_SET,
    VIEWS,
    standout,
)

METHODS = ("shapley", "lexical", "semantic", "bm25")
LABELS = ("verbatim", "paraphrastic", "non-obvious influence", "none")
COLUMNS = [
    "val_set",
    "val_id",
    "variant",
    "doc_id",
    "shapley_value",
    "shapley_rank",
    "lexical_rank",
    "semantic_rank",
    "bm25_rank",
    "ngram_containment",
    "containment_doc_in_val",
    "longest_common_span",
    "semantic_sim",
    "bm25_score",
    "standout_z",
    "is_target",
    "label",
]


# The default influence_z per z basis (`views.View.z_of`): the smallest z whose share among unrelated
# top-10 documents was at most 5% on the tuning half of the hand-written cases, in each of three runs
# (benchmarks/label_threshold.py; docs/benchmarks.md, "Session 20", where both were re-chosen: until then
# `compare` read the raw value's z under these views, so the earlier thresholds were chosen on that z).
# A basis not measured takes the strictest.
INFLUENCE_Z = {"value_cosine": 3.0, "checkpoint_cosine": 10.0}


@dataclass(frozen=True)
class Thresholds:
    """Label thresholds; written into `summary.md` and `compare.json` with the results."""

    verbatim_containment: float = 0.5  # n-gram containment (either direction) at or above: verbatim
    verbatim_span: int = 20  # or a common run of at least this many words: verbatim
    paraphrase_semantic: float = 0.7  # cosine at or above (and not verbatim): paraphrastic
    low_containment: float = 0.1  # "low" n-gram overlap, for non-obvious influence
    low_semantic: float = 0.5  # "low" semantic similarity, for non-obvious influence
    # standout_z at or above, for non-obvious influence; None: by the z's basis (`INFLUENCE_Z`)
    influence_z: float | None = None

    def for_basis(self, z_of: str | None = None) -> Thresholds:
        """These thresholds with `influence_z` filled in for a z of column `z_of` when it was not given
        (the strictest of `INFLUENCE_Z` for a basis not measured, or none named)."""
        if self.influence_z is not None:
            return self
        return replace(self, influence_z=INFLUENCE_Z.get(z_of, max(INFLUENCE_Z.values())))

    @classmethod
    def parse(cls, items: Mapping[str, str]) -> Thresholds:
        fields = cls.__dataclass_fields__
        out: dict[str, Any] = {}
        for key, raw in items.items():
            if key not in fields:
                raise UserError(f"unknown threshold {key!r}; known: {', '.join(fields)}")
            try:
                out[key] = int(raw) if fields[key].type == "int" else float(raw)
            except ValueError as exc:
                raise UserError(f"threshold {key}={raw!r} is not a number") from exc
        return cls(**out)


def label(row: Mapping[str, Any], t: Thresholds, k: int, test_standout: bool = True) -> str:
    """The label of one pair (see module docstring). Missing measures count as not high, not low; a
    missing `standout_z` does not stand out. `test_standout=False`: a run without a reference set."""
    c = max(_num(row["ngram_containment"]), _num(row["containment_doc_in_val"]))
    span = _num(row["longest_common_span"])
    sem = _num(row["semantic_sim"])
    if c >= t.verbatim_containment or span >= t.verbatim_span:
        return "verbatim"
    if sem >= t.paraphrase_semantic:
        return "paraphrastic"
    top = not pd.isna(row["shapley_rank"]) and row["shapley_rank"] <= k and _num(row["shapley_value"]) > 0
    stands_out = not test_standout or _num(row.get("standout_z")) >= t.for_basis().influence_z
    if top and c < t.low_containment and sem < t.low_semantic and not math.isnan(sem) and stands_out:
        return "non-obvious influence"
    return "none"


def _compared(view: str, n_reference: int) -> str:
    """What a standout z under `view` compares a text with, in words (`views.NEAREST_REFERENCE`)."""
    k = NEAREST_REFERENCE.get(_z_of(view))
    if k is None or n_reference <= k:
        return f"{n_reference} examples of the run's reference set"
    return (
        f"{k} of the run's {n_reference} reference examples nearest the text (those whose values over the "
        "documents correlate most with its own)"
    )


def _z_of(view: str) -> str:
    """The column whose standout z labels pairs under `view` (`views.View.z_of`)."""
    return VIEWS[view].z_of if view in VIEWS else "value"


def _z_unit(view: str) -> str:
    """What one unit of the standout z under `view` is, in words (`views.POOLED_SCALE`)."""
    if _z_of(view) in POOLED_SCALE:
        return "typical spreads (the root median variance of every document's values for the same texts)"
    return "of its own sample standard deviations"


def _z_basis(view: str) -> str:
    names = {
        "value_cosine": "gradient cosine (`value_cosine`)",
        "checkpoint_cosine": "gradient cosine at the kept checkpoints (`checkpoint_cosine`)",
    }
    return names.get(_z_of(view), "raw value")


def _num(x: Any) -> float:
    return float("nan") if x is None or pd.isna(x) else float(x)


# ---------------------------------------------------------------- reading the run


def _run_values(run: Path, view: str | None) -> tuple[pd.DataFrame, str]:
    """Per-example scores of the run under `view` (a view name; default: the run's default view),
    computed at read time, and the name of the view used."""
    values = RunValues.read(run)
    if not values.has_examples():
        raise UserError(f"{run}: no example_values.parquet; was the run written with per-example values?")
    if view is not None:
        view = view.removeprefix("view_")  # the column names of runs before manifest schema 2 still work
        if view == ATTRIBUTION_COLUMN:
            view = None
        elif view not in VIEWS:
            raise UserError(
                f"{values.run.example_values_path}: no column {view!r}; views: {', '.join(VIEWS)}"
            )
    table = values.view(view)
    return table, table.attrs["view"]


def _val_examples(run: Path) -> pd.DataFrame:
    texts = RunDir(run).val_sets()
    if not texts:
        raise UserError(f"{run}: no val_sets/*.jsonl; is this a run directory written by `attribution run`?")
    rows = []
    for name, items in texts.items():
        for t in items:
            target = t.meta.get("target_id")
            rows.append(
                {
                    "val_set": name,
                    "val_id": t.id,
                    "text": t.text,
                    "variant": t.meta.get("variant"),
                    "target_id": str(target) if target not in (None, "") else "",
                }
            )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- comparison


def _rank_map(ordered: list[str]) -> dict[str, int]:
    return {d: i + 1 for i, d in enumerate(ordered)}


def _correlations(frame: pd.DataFrame) -> dict[str, tuple[float, float]]:
    from scipy.stats import kendalltau, spearmanr

    out = {}
    for method, score in (
        ("lexical", "ngram_containment"),
        ("semantic", "semantic_sim"),
        ("bm25", "bm25_score"),
    ):
        f = frame[["shapley_value", score]].dropna()
        if len(f) < 3 or f["shapley_value"].nunique() < 2 or f[score].nunique() < 2:
            out[method] = (float("nan"), float("nan"))
            continue
        out[method] = (
            float(spearmanr(f["shapley_value"], f[score]).statistic),
            float(kendalltau(f["shapley_value"], f[score]).statistic),
        )
    return out


def _compare_example(
    ix: Indexes, ex: Any, qvecs: np.ndarray | None, values: pd.Series, z: pd.Series, k: int, depth: int
):
    """Pooled pairs of one validation example, plus its per-method correlations and target hits.

    `values`, `z`: the example's attribution and standout z, by doc_id."""
    text = ex.text
    shapley = values.sort_values(ascending=False, kind="stable")
    ranked = {"shapley": shapley.index.tolist()}
    doc_ids = ix.store.docs["doc_id"].to_numpy()
    ranked["lexical"] = [str(doc_ids[r]) for r, *_ in ix.lexical.search(text, depth)]
    bm25_all = None
    if ix.semantic is not None and qvecs is not None:
        ranked["semantic"] = [str(doc_ids[r]) for r, _ in ix.semantic.search_vectors(qvecs, depth)]
    if ix.bm25 is not None:
        bm25_all = ix.bm25.scores(text)
        matched = np.flatnonzero(bm25_all > 0)  # a document sharing no query term has no BM25 rank
        ranked["bm25"] = doc_ids[matched[np.argsort(-bm25_all[matched], kind="stable")]].tolist()
    ranks = {m: _rank_map(lst) for m, lst in ranked.items()}
    pool: list[str] = []
    for m in METHODS:
        for d in ranked.get(m, [])[:k]:
            if d not in pool:
                pool.append(d)
    val_words = word_spans(text)[0]
    rows = [ix.store.row(d) for d in pool]
    n = ix.ngram
    sims = (
        ix.semantic.similarity(qvecs, [r for r in rows if r is not None])
        if ix.semantic is not None and qvecs is not None
        else None
    )
    sim_iter = iter(sims) if sims is not None else None
    records = []
    for d, r in zip(pool, rows, strict=True):
        rec: dict[str, Any] = {
            "val_set": ex.val_set,
            "val_id": ex.val_id,
            "variant": ex.variant,
            "doc_id": d,
            "shapley_value": float(values.get(d, np.nan)),
            "standout_z": float(z.get(d, np.nan)),
            "is_target": bool(ex.target_id) and d == ex.target_id,
        }
        for m in METHODS:
            rec[f"{m}_rank"] = ranks.get(m, {}).get(d)
        if r is None:  # a run document the index does not hold
            rec.update(
                ngram_containment=np.nan,
                containment_doc_in_val=np.nan,
                longest_common_span=np.nan,
                semantic_sim=np.nan,
                bm25_score=np.nan,
            )
        else:
            doc_text = ix.store[r]
            rec["ngram_containment"] = containment(text, doc_text, n)
            rec["containment_doc_in_val"] = containment(doc_text, text, n)
            rec["longest_common_span"] = longest_common_span(val_words, word_spans(doc_text)[0])[2]
            rec["semantic_sim"] = float(next(sim_iter)) if sim_iter is not None else np.nan
            rec["bm25_score"] = float(bm25_all[r]) if bm25_all is not None else np.nan
        records.append(rec)
    frame = pd.DataFrame(records)
    hits = (
        {m: (ex.target_id in ranked[m][:k], ex.target_id in ranked[m][:1]) for m in ranked}
        if ex.target_id
        else {}
    )
    return frame, _correlations(frame), hits


def compare_run(
    run_dir: str | os.PathLike,
    index_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    k: int = 10,
    thresholds: Thresholds | None = None,
    view: str | None = None,
    depth: int | None = None,
) -> pd.DataFrame:
    """Compare a run's Shapley rankings with the index's rankings; returns the comparison table.

    With `out`, writes `comparison.parquet`, `summary.csv`, `summary.md` and `compare.json` there.
    `depth` (default max(100, k)) is how deep lexical and semantic rankings are retrieved: a document
    beyond it has no rank under that method.
    """
    run, t = Path(run_dir), thresholds or Thresholds()
    if k < 1:
        raise UserError("k must be at least 1")
    depth = max(depth or 100, k)
    table, column = _run_values(run, view)
    z_of = _z_of(column)  # `RunValues.view` keeps the columns a view reads
    t = t.for_basis(z_of)
    table["standout_z"] = standout(table, z_of)  # the same under every scaled/shifted view of `z_of`
    n_reference = int(table.loc[table.val_set == REFERENCE_SET, "val_id"].nunique())
    test_standout = n_reference >= MIN_REFERENCE
    if not test_standout:
        warnings.warn(
            f"{run}: no fixed reference set with at least {MIN_REFERENCE} examples (this run has "
            f"{n_reference}), so `non-obvious influence` cannot test whether a document stands out for "
            "the text: it also counts documents that help every text",
            UserWarning,
            stacklevel=2,
        )
    examples = _val_examples(run)
    examples = examples[examples.val_set != REFERENCE_SET]  # the reference is not labelled against itself
    ix = Indexes.load(index_dir)
    grouped = {
        key: g.set_index("doc_id")[[ATTRIBUTION_COLUMN, "standout_z"]].astype("float64")
        for key, g in table.groupby(["val_set", "val_id"])
    }
    examples = examples[[(s, v) in grouped for s, v in zip(examples.val_set, examples.val_id, strict=True)]]
    if examples.empty:
        raise UserError(
            f"{run}: example_values.parquet has no values for any validation example in val_sets/ "
            f"(other than the reference set {REFERENCE_SET!r})"
        )
    qvecs_all = None
    if ix.semantic is not None:
        from attribution.analysis.semantic import embed_windows

        vecs, owner = embed_windows(examples.text.tolist(), ix.semantic.params)
        qvecs_all = [vecs[owner == i] for i in range(len(examples))]
    frames, stats = [], []
    for i, ex in enumerate(tqdm(list(examples.itertuples(index=False)), desc="compare", unit="example")):
        g = grouped[(ex.val_set, ex.val_id)]
        qvecs = None if qvecs_all is None else qvecs_all[i]
        frame, corr, hits = _compare_example(ix, ex, qvecs, g[ATTRIBUTION_COLUMN], g["standout_z"], k, depth)
        frames.append(frame)
        stats.append(
            {
                "val_set": ex.val_set,
                "val_id": ex.val_id,
                "variant": ex.variant,
                "correlations": corr,
                "hits": hits,
            }
        )
    comparison = pd.concat(frames, ignore_index=True)
    for m in METHODS:
        comparison[f"{m}_rank"] = comparison[f"{m}_rank"].astype("Int64")
    comparison["longest_common_span"] = comparison["longest_common_span"].astype("Int64")
    comparison["label"] = [label(r, t, k, test_standout) for r in comparison.to_dict("records")]
    comparison = comparison[COLUMNS]
    if out is not None:
        _write(Path(out), comparison, stats, run, Path(index_dir), ix, column, k, depth, t, n_reference)
    return comparison


# ---------------------------------------------------------------- summaries


def summarize(comparison: pd.DataFrame, stats: list[dict], k: int) -> pd.DataFrame:
    """One row per (val_set, variant, method) plus an `all` variant: retrieval of targets, correlations, labels."""
    per = pd.DataFrame(stats)
    rows = []
    groups = (
        [("all", per)] + [(str(v), g) for v, g in per.groupby(per.variant.fillna("none"))]
        if per.variant.notna().any()
        else [("all", per)]
    )
    for val_set in sorted(per.val_set.unique()):
        for variant, g0 in groups:
            g = g0[g0.val_set == val_set]
            if g.empty:
                continue
            keys = set(zip(g.val_set, g.val_id, strict=True))
            pairs = comparison[
                [(s, v) in keys for s, v in zip(comparison.val_set, comparison.val_id, strict=True)]
            ]
            for m in METHODS:
                hits = [h[m] for h in g["hits"] if m in h]
                corr = [c[m] for c in g["correlations"] if m in c] if m != "shapley" else []
                top = pairs[pairs[f"{m}_rank"].notna() & (pairs[f"{m}_rank"] <= k)]
                row = {
                    "val_set": val_set,
                    "variant": variant,
                    "method": m,
                    "k": k,
                    "n_examples": len(g),
                    "n_with_target": len(hits),
                    "precision_at_1": np.mean([h[1] for h in hits]) if hits else np.nan,
                    "precision_at_k": np.mean([h[0] for h in hits]) / k if hits else np.nan,
                    "recall_at_k": np.mean([h[0] for h in hits]) if hits else np.nan,
                    "spearman_mean": np.nanmean([c[0] for c in corr])
                    if any(not math.isnan(c[0]) for c in corr)
                    else np.nan,
                    "kendall_mean": np.nanmean([c[1] for c in corr])
                    if any(not math.isnan(c[1]) for c in corr)
                    else np.nan,
                    "n_correlated": sum(not math.isnan(c[0]) for c in corr),
                    "top_pairs": len(top),
                }
                for lab in LABELS:
                    row[f"n_{lab.replace(' ', '_').replace('-', '_')}"] = int((top["label"] == lab).sum())
                rows.append(row)
    return pd.DataFrame(rows)


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _write(
    out: Path,
    comparison: pd.DataFrame,
    stats: list[dict],
    run: Path,
    index_dir: Path,
    ix: Indexes,
    column: str,
    k: int,
    depth: int,
    t: Thresholds,
    n_reference: int,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(comparison, stats, k)
    with atomic_path(out / "comparison.parquet") as tmp:
        comparison.to_parquet(tmp, index=False)
    with atomic_path(out / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    top = comparison[
        comparison.shapley_rank.notna() & (comparison.shapley_rank <= k) & (comparison.shapley_value > 0)
    ]
    counts = {lab: int((top.label == lab).sum()) for lab in LABELS}
    n_top = len(top)
    tested = n_reference >= MIN_REFERENCE
    non_obvious = top[top.label == "non-obvious influence"]
    # the experiment's control: a non-obvious pair whose document is not the text's target has no known relation
    by_target = (
        {"target": int(non_obvious.is_target.sum()), "not_target": int((~non_obvious.is_target).sum())}
        if any(s["hits"] for s in stats)
        else None
    )
    info = {
        "run": str(run),
        "index": str(index_dir),
        "index_generation": ix.meta["generation"],
        "index_fingerprint": ix.meta["corpus_fingerprint"],
        "view": column,
        "k": k,
        "depth": depth,
        "ngram": ix.ngram,
        "thresholds": asdict(t),
        "shapley_top_k_labels": counts,
        "standout": {
            "tested": tested,
            "reference_set": REFERENCE_SET,
            "n_reference_examples": n_reference,
            "min_reference_examples": MIN_REFERENCE,
            "influence_z": t.influence_z,
            "z_of": _z_of(column),
        },
        "non_obvious_influence_by_target": by_target,
        "missing_from_index": int(comparison.ngram_containment.isna().sum()),
    }
    with atomic_write(out / "compare.json") as fh:
        json.dump(info, fh, indent=2)
    allrows = summary[summary.variant == "all"]
    lines = [
        "# Shapley vs lexical, semantic and BM25 attribution",
        "",
        f"Run `{run}` (view `{column}`), index `{index_dir}` (generation {ix.meta['generation']}); "
        f"{comparison[['val_set', 'val_id']].drop_duplicates().shape[0]} validation examples, top-{k} per method.",
        "",
        f"**{counts['non-obvious influence']} of {n_top} top contributors "
        f"({100 * counts['non-obvious influence'] / max(n_top, 1):.1f}%) are `non-obvious influence`**: "
        f"top-{k} by Shapley value with a positive value, yet low n-gram overlap and low semantic similarity"
        f"{', standing out from the reference set' if tested else ''}. "
        f"Verbatim {counts['verbatim']}, paraphrastic {counts['paraphrastic']}, other {counts['none']}.",
        "",
        (
            f"Standout test: a pair is `non-obvious influence` only if the document's {_z_basis(column)} for the text "
            f"is at least {t.influence_z:g} {_z_unit(column)} above its mean value over the "
            f"{_compared(column, n_reference)} (`standout_z` >= {t.influence_z:g}; the same "
            "under every scaled or shifted view of it), so documents that help every text are left out."
            if tested
            else f"Standout not tested: this run has {n_reference} reference examples (fewer than "
            f"{MIN_REFERENCE}), so `non-obvious influence` also counts documents that help every text."
        ),
        "",
    ]
    if by_target is not None:
        lines += [
            f"Of the {len(non_obvious)} `non-obvious influence` pairs, {by_target['target']} are the text's "
            f"target document and {by_target['not_target']} are documents with no known relation to the text.",
            "",
        ]
    lines += [
        "| method | val set | P@1 (target) | recall@k (target) | Spearman vs Shapley | Kendall vs Shapley |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in allrows.itertuples():
        lines.append(
            f"| {r.method} | {r.val_set} | {_fmt(r.precision_at_1)} | {_fmt(r.recall_at_k)} | "
            f"{_fmt(r.spearman_mean)} | {_fmt(r.kendall_mean)} |"
        )
    lines += [
        "",
        "Correlations: per example, over the documents pooled from all methods' top-k, Shapley value vs the "
        f"method's score (exact {ix.ngram}-gram containment, MiniLM cosine, BM25), then averaged. "
        "P@1 and recall@k count examples whose `target_id` (the training document they were derived from) "
        "is ranked first / within the top k.",
        "",
        "Thresholds: "
        + ", ".join(f"`{key}` = {val}" for key, val in asdict(t).items())
        + f"; n-grams of {ix.ngram} words.",
    ]
    with atomic_write(out / "summary.md") as fh:
        fh.write("\n".join(lines) + "\n")
