"""The copyright experiment (the paper's Table 2): does valuation find the original behind a rewrite?

For each chosen training document ("original") we make validation texts that are ever farther
from it (partial copy, paraphrase, significant rewrite, a similar-topic document), train GPT-2 once
per In-Run Shapley order while valuing every training document against every variant, and ask: at
which rank does the original come among all training documents? The same question is asked of
three retrieval baselines that look only at the text: BM25, MiniLM similarity and word 8-gram
containment. Rank 1 = top contributor / best match.

In-Run Shapley ranks are given for the raw additive `value` and for every attribution view of the
same run (`attribution.values.views`: per-token, contrast, cosine, ...), since "which document is this text
derived from?" is the question views exist for. The headline table shows the raw value and the
default view; `ranks.csv` has one `irs_order{1,2}[_<view>]` column per order and view.

What is kept out of training: the variant texts (they are validation data only) and the whole
similar-topic pool (each "similar" variant is a real corpus document, so it must never be trained
on). An `exact` copy cannot be valued here: the training loop drops a training document identical to
a validation text, which would remove the original itself. The originals are never taken into the
run's reference set (which is held out of training too).

Hand-written cases (`corpora/handwritten`, `originals=` / `variants=`): the originals are added to
the training corpus and the variants are the validation texts as written, so nothing is picked or
generated, and no pool is held out (a hand-written "similar" text is not a corpus document).

`ranks.csv` has one row per variant, so `table_for(OUT, ["hw-b-*"])` (`attribution experiment
table`) recomputes the table for the variants of any subset of originals, e.g. a held-out half.
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from attribution.corpus import Document, read_corpus_located
from attribution.errors import BadInputError, UserError
from attribution.io import atomic_path, atomic_write
from attribution.text import ngrams, words
from attribution.values import Manifest, RunDir, RunValues, rank_and_control
from attribution.values.rundir import DOCS, EXAMPLE_VALUES
from attribution.values.views import DEFAULT_VIEW, VIEWS, column_of
from attribution.variants.build import (
    KINDS,
    add_distances,
    build_variants,
    distance_summary,
    load_docs,
    parse_kinds,
    pick_targets,
    select_ids,
    split_pool,
    write_jsonl,
)
from attribution.variants.rewriters import OfflineRewriter, Rewriter

BASELINES = {"bm25": "BM25", "semantic": "MiniLM similarity", "containment": "8-gram containment"}
ORDINAL = {"1": "1st", "2": "2nd"}
VALUED_KINDS = tuple(k for k in KINDS if k != "exact")  # see the module docstring for why not exact


def method_column(order: int, view: str = "value") -> str:
    """Column of `ranks.csv` for one order and attribution view (`irs_order1` is the raw value)."""
    return f"irs_order{order}" if view == "value" else f"irs_order{order}_{view}"


def method_label(column: str) -> str:
    """`irs_order2_contrast` -> 'In-Run Shapley 2nd order, contrast'; baselines by name."""
    if column in BASELINES:
        return BASELINES[column]
    order, _, view = column.removeprefix("irs_order").partition("_")
    return f"In-Run Shapley {ORDINAL.get(order, order)} order, {view or 'value'}"


def headline_methods(columns: Iterable[str]) -> list[str]:
    """The main table's methods: raw value and the default view per order, then the text baselines."""
    out = []
    for order in (1, 2):
        out += [
            c
            for c in (method_column(order), method_column(order, DEFAULT_VIEW))
            if c in columns and c not in out
        ]
    return out + [b for b in BASELINES if b in columns]


PAPER = {  # average rank of the original among ~320k training corpora (paper, Table 2): 1st, 2nd order, BM25
    "partial": (1, 1, 1),
    "paraphrase": (1, 1, 1),
    "significant": (32.3, 32, 1.6),
    "similar": (145.6, 141.6, 20917.3),
}


@dataclass
class CopyrightExperiment:
    corpus: list[str]
    out: Path
    pick: int | None = 8
    ids: list[str] | None = None
    kinds: str | Sequence[str] = "partial,paraphrase,significant,similar"
    preset: str = "cpu-tiny"
    steps: int | None = None
    epochs: float | None = 1.0  # used when steps is None: one pass, so every original is trained on
    max_words: int = 150
    orders: Sequence[int] = (1, 2)
    optimizer: str = "adamw"
    optimizer_aware: bool = True  # AdamW-preconditioned values: closer to the real step (docs/benchmarks.md)
    pool_fraction: float = 0.1
    # Where "similar" documents come from: None = a `pool_fraction` share of `corpus`, held out of
    # training; or other corpora (e.g. the full built-in corpus), minus every training document.
    pool_corpus: list[str] | None = None
    device: str = "auto"
    seed: int = 0
    rewriter: Rewriter = field(default_factory=OfflineRewriter)
    run_overrides: dict = field(default_factory=dict)  # extra RunConfig fields (tests: tiny models)
    # Hand-written cases: corpus-format originals added to training, validation-format variants used
    # as given (`kinds` still chooses among them); pick, ids, max_words, rewriter and pool_* then play no part.
    originals: list[str] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)


@dataclass
class ExperimentResult:
    table: pd.DataFrame
    ranks: pd.DataFrame
    markdown: str
    seconds: float
    run_dirs: dict[int, Path]


def outside_pool(candidates: Sequence, training: Sequence) -> list:
    """Pool documents from another corpus that are not in training, by id or by text."""
    ids = {d.doc_id for d in training}
    texts = {d.text.strip() for d in training}
    pool = [d for d in candidates if d.doc_id not in ids and d.text.strip() not in texts]
    if not pool:
        raise UserError("the similar-topic pool corpus has no document outside the training corpus")
    return pool


def _generated(exp: CopyrightExperiment, docs: list[Document], kinds: list[str]):
    """Originals picked from the corpus, their similar-topic pool and generated variant records."""
    if (exp.pick is None) == (not exp.ids):
        raise UserError("give exactly one of --pick N or --ids ID,...")
    targets = (
        select_ids(docs, exp.ids)
        if exp.ids
        else pick_targets(docs, int(exp.pick), exp.seed, max_words=exp.max_words)
    )
    if "similar" not in kinds:
        pool = []
    elif exp.pool_corpus:
        pool = outside_pool(load_docs(tuple(exp.pool_corpus)), docs)
    else:
        pool = split_pool(docs, targets, exp.pool_fraction, exp.seed)
    records = build_variants(
        targets, kinds, rewriter=exp.rewriter, pool=pool, seed=exp.seed, similar_max_words=2 * exp.max_words
    )
    return targets, pool, records


def _handwritten(
    exp: CopyrightExperiment, docs: list[Document], kinds: list[str]
) -> tuple[list[Document], list[dict]]:
    """Hand-written originals (new training documents) and their variants as given, checked line by
    line so that a typo in a 300-word case is named before a long training run, not after."""
    if exp.ids:
        raise UserError("--ids picks originals from the corpus; with --originals they are given")
    if exp.pool_corpus:
        raise UserError("--pool-corpus is for generated 'similar' variants; hand-written ones need no pool")
    corpus_ids = {d.doc_id for d in docs}
    originals = []
    for path, line, doc in read_corpus_located(exp.originals):
        if doc.doc_id in corpus_ids:
            key = "meta.id" if str(doc.meta.get("id")) == doc.doc_id else "id"
            raise BadInputError(
                path,
                line,
                f"{key} {doc.doc_id!r} is already a --corpus document; an original needs its own id",
            )
        originals.append(doc)
    by_id = {d.doc_id: d for d in originals}
    records = []
    for path, line, v in read_corpus_located(exp.variants):
        kind, target = v.meta.get("variant"), v.meta.get("target_id")
        if kind not in VALUED_KINDS:
            raise BadInputError(
                path,
                line,
                f"meta.variant {kind!r} is not a kind this experiment values ({', '.join(VALUED_KINDS)})",
            )
        if not isinstance(target, str) or target not in by_id:
            raise BadInputError(path, line, f"meta.target_id {target!r} is not an original")
        if kind in kinds:
            meta = {**v.meta, "target_source": by_id[target].source}
            records.append({"id": v.doc_id, "text": v.text, "meta": meta})
    if not records:
        raise UserError(f"no variant of the kinds {', '.join(kinds)} in {', '.join(map(str, exp.variants))}")
    add_distances(records, originals)
    return originals, records


def _plan(exp: CopyrightExperiment):
    """Originals, pool and variant records, written to OUT/variants/<kind>.jsonl; training documents."""
    kinds = parse_kinds(exp.kinds)
    if "exact" in kinds:
        raise UserError(
            "the copyright experiment cannot value 'exact' variants: the training loop keeps a "
            "document identical to a validation text out of training, so the original would vanish"
        )
    if bool(exp.originals) != bool(exp.variants):
        raise UserError("--originals and --variants go together: give both (hand-written cases) or neither")
    docs = load_docs(tuple(exp.corpus))
    if exp.originals:
        targets, records = _handwritten(exp, docs, kinds)
        pool: list[Document] = []
        docs = docs + targets
    else:
        targets, pool, records = _generated(exp, docs, kinds)
    paths: dict[str, str] = {}
    for kind in (k for k in kinds if any(r["meta"]["variant"] == k for r in records)):
        path = exp.out / "variants" / f"{kind}.jsonl"
        write_jsonl(path, [r for r in records if r["meta"]["variant"] == kind])
        paths[kind] = str(path)
    with atomic_write(exp.out / "variants" / "heldout_ids.txt") as fh:
        fh.write("".join(f"{d.doc_id}\n" for d in pool))
    return docs, targets, pool, records, paths


def _train(
    exp: CopyrightExperiment,
    order: int,
    val: dict[str, str],
    exclude: list[str],
    originals: list[str],
    set_size: int,
) -> Path:
    from attribution.train import RunConfig, train_and_value

    run_dir = exp.out / f"run-order{order}"
    cfg = RunConfig(
        corpus=list(exp.corpus) + list(exp.originals),
        val=val,
        out=str(run_dir),
        preset=exp.preset,
        steps=exp.steps,
        epochs=exp.epochs if exp.steps is None else None,
        order=order,
        optimizer=exp.optimizer,
        seed=exp.seed,
        optimizer_aware=exp.optimizer_aware and exp.optimizer == "adamw",
        exclude_ids=tuple(exclude),
        keep_ids=tuple(originals),
        device=exp.device,
        per_example_max=max(64, set_size),
        in_run_cosine=True,  # the experiment ranks every view, the in-run cosine ones included
        **exp.run_overrides,
    )
    if RunDir(run_dir).finished_with(cfg.resolved(), needs=(EXAMPLE_VALUES,)):
        return run_dir  # the same run already finished: reuse it
    return Path(train_and_value(cfg))  # its checkpoint cosines come with it (RunConfig.checkpoint_view)


def _irs_ranks(
    run_dir: Path, order: int, records: Sequence[dict], train_ids: list[str], originals: Sequence[str]
) -> tuple[dict[str, list[float]], list[bool]]:
    """Rank of each record's original among all training documents under every attribution view of
    the run's per-example values (a document never sampled scores 0), and whether the original was
    trained on at all. Keys are `method_column(order, view)`; `control_<key>` is the mean rank of the
    other `originals` for the same text."""
    values = RunValues.read(run_dir)
    ev = values.with_views()
    dv = values.doc_values
    seen = set(dv.loc[dv["n_seen"] > 0, "doc_id"])
    names = [v for v in VIEWS if column_of(v) in ev.columns and ev[column_of(v)].notna().all()]
    row = {d: i for i, d in enumerate(train_ids)}
    ranks: dict[str, list[float]] = {method_column(order, v): [] for v in names}
    was_seen = []
    groups = {k: g for k, g in ev.groupby(["val_set", "val_id"], sort=False)}
    for r in records:
        kind, target = r["meta"]["variant"], r["meta"]["target_id"]
        g = groups.get((kind, r["id"]))
        if g is None:
            raise UserError(f"{run_dir}: no per-example values for {kind}/{r['id']}")
        idx = g["doc_id"].astype(str).map(row)
        ok = idx.notna().to_numpy()
        at = idx[ok].astype(int).to_numpy()
        others = [row[t] for t in originals if t != target]
        for v in names:
            scores = np.zeros(len(train_ids), dtype=np.float64)
            scores[at] = g[column_of(v)].to_numpy(dtype=np.float64)[ok]
            # control: where the *other* originals rank for this text; about (n+1)/2 for a fair view,
            # lower when a view simply favours documents like the originals (e.g. short ones)
            rank, control = rank_and_control(scores, row[target], others)
            ranks[method_column(order, v)].append(rank)
            ranks.setdefault(f"control_{method_column(order, v)}", []).append(control)
        was_seen.append(target in seen)
    return ranks, was_seen


def _text_ranks(
    records: Sequence[dict], train_texts: list[str], train_ids: list[str], originals: Sequence[str] = ()
) -> dict[str, list[float]]:
    """Ranks of the original under the text-only baselines, over the same training documents, and
    `control_<name>`: the mean rank of the other `originals` for the same text, as for the views."""
    import bm25s

    from attribution.embeddings import embed

    row = {d: i for i, d in enumerate(train_ids)}
    targets = [r["meta"]["target_id"] for r in records]
    queries = [r["text"] for r in records]

    retriever = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    retriever.index(bm25s.tokenize(train_texts, stopwords="en", show_progress=False), show_progress=False)
    q_tokens = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
    # Semantic search as a retriever does it: one MiniLM vector per text (its first 256 word pieces).
    doc_vecs = embed(train_texts, show_progress=len(train_texts) > 500)
    q_vecs = embed(queries)
    doc_grams = [ngrams(words(t), 8) for t in train_texts]

    def containment(q: str) -> np.ndarray:
        qg = ngrams(words(q), 8)
        return np.array([len(qg & g) / len(qg) if qg else 0.0 for g in doc_grams])

    scorers = {
        "bm25": lambda i: np.asarray(retriever.get_scores(q_tokens[i])),
        "semantic": lambda i: doc_vecs @ q_vecs[i],
        "containment": lambda i: containment(queries[i]),
    }
    out: dict[str, list[float]] = {}
    for name, score in scorers.items():
        for i, target in enumerate(targets):
            rank, control = rank_and_control(
                score(i), row[target], [row[o] for o in originals if o != target]
            )
            out.setdefault(name, []).append(rank)
            out.setdefault(f"control_{name}", []).append(control)
    return out


def _methods(ranks_or_table: pd.DataFrame) -> list[str]:
    """Method names in a ranks frame (`irs_order1_per_token`, `bm25`) or a summary table (from
    `irs_order1_per_token_mean_rank`); `control_*` columns are not methods."""
    cols = ranks_or_table.columns
    irs = [c for c in cols if c.startswith("irs_order") and not c.endswith(("_rank", "_ranks", "_share"))]
    irs += [
        c.removesuffix("_mean_rank") for c in cols if c.startswith("irs_order") and c.endswith("_mean_rank")
    ]
    base = [b for b in BASELINES if b in cols or f"{b}_mean_rank" in cols]
    return list(dict.fromkeys(irs)) + base


def summarize(ranks: pd.DataFrame, n_train: int) -> pd.DataFrame:
    """Per variant kind (nearest first): mean, median and every rank per method, share ranked first /
    in the top 1%, the other-originals control, distances. `ranks` is `ranks.csv` or any subset of
    its rows, so a table for some of the originals is this function on their rows."""
    methods = _methods(ranks)
    rank = {k: i for i, k in enumerate(KINDS)}
    groups = sorted(ranks.groupby("variant", sort=False), key=lambda kg: rank.get(kg[0], len(KINDS)))
    rows = []
    for kind, g in groups:
        row: dict = {"variant": kind, "n": len(g), "n_train_docs": n_train}
        for m in methods:
            row[f"{m}_mean_rank"] = round(float(g[m].mean()), 2)
            row[f"{m}_median_rank"] = float(g[m].median())
            row[f"{m}_ranks"] = " ".join(f"{x:g}" for x in g[m])  # in ranks.csv order
            row[f"{m}_top1_share"] = round(float((g[m] <= 1.0).mean()), 3)
            row[f"{m}_top1pct_share"] = round(float((g[m] <= max(1.0, 0.01 * n_train)).mean()), 3)
        for c in (c for c in g.columns if c.startswith("control_")):
            row[f"{c}_mean_rank"] = round(float(g[c].mean()), 2)
        for key in ("containment_8", "jaccard_3", "cosine_minilm"):
            row[f"{key}_median"] = round(float(g[key].median()), 4)
        if "target_seen" in g:
            row["originals_trained_share"] = round(float(g["target_seen"].mean()), 3)
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(r: pd.Series, m: str, each: bool = False) -> str:
    """`mean (median)`, or with `each` `mean [every rank]` (an older table.csv has no ranks column)."""
    if each and f"{m}_ranks" in r:
        return f"{r[f'{m}_mean_rank']:.1f} [{', '.join(str(r[f'{m}_ranks']).split())}]"
    return f"{r[f'{m}_mean_rank']:.1f} ({r[f'{m}_median_rank']:g})"


def to_markdown(table: pd.DataFrame, meta: dict, each: bool = False) -> str:
    """The headline table (methods x kinds), then one views x kinds table per order (with `each`, every
    original's rank in the views tables instead of the median). `meta["subset"]`, when set, says
    which variants the table covers."""
    methods = headline_methods(_methods(table))
    head = (
        "| variant | n | "
        + " | ".join(method_label(m) for m in methods)
        + " | 8-gram cont. | 3-gram Jacc. | MiniLM cos. |"
    )
    lines = [f"Variants of the originals {meta['subset']}.", ""] if meta.get("subset") else []
    lines += [
        f"Average rank of the original among {meta['n_train_docs']} training documents "
        f"(1 = top; median in parentheses). Preset {meta['preset']}, {meta['steps']} steps, "
        f"optimizer {meta['optimizer']}{' (optimizer-aware values)' if meta.get('optimizer_aware') else ''}, "
        f"seed {meta['seed']}. The default attribution view is `{DEFAULT_VIEW}`.",
        "",
        head,
        "|" + "---|" * (2 + len(methods) + 3),
    ]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['variant']} | {r['n']} | "
            + " | ".join(_cell(r, m) for m in methods)
            + f" | {r['containment_8_median']:.3f} | {r['jaccard_3_median']:.3f} | {r['cosine_minilm_median']:.3f} |"
        )
    kinds = list(table["variant"])
    for order in (1, 2):
        present = [v for v in VIEWS if f"{method_column(order, v)}_mean_rank" in table.columns]
        if not present:
            continue
        lines += [
            "",
            f"Attribution views, In-Run Shapley {ORDINAL[str(order)]} order (average rank of the original; "
            f"{'every rank in brackets' if each else 'median in parentheses'}). Control: the average rank of the *other* originals for the same texts, "
            f"about {(meta['n_train_docs'] + 1) / 2:.0f} when a view does not simply favour documents like the originals:",
            "",
            "| view | " + " | ".join(kinds) + " | control |",
            "|" + "---|" * (2 + len(kinds)),
        ]
        rows = [(f"**{v}** (default)" if v == DEFAULT_VIEW else v, method_column(order, v)) for v in present]
        rows += [
            (f"{label} (text)", b) for b, label in BASELINES.items() if f"{b}_mean_rank" in table.columns
        ]
        for name, m in rows:
            col = f"control_{m}_mean_rank"
            control = f"{table[col].mean():.1f}" if col in table.columns else "n/a"
            lines.append(
                f"| {name} | "
                + " | ".join(_cell(r, m, each) for _, r in table.iterrows())
                + f" | {control} |"
            )
    lines += [
        "",
        "Paper (GPT-2 124M, ~320k training corpora): average rank, 1st order / 2nd order / BM25:",
        "",
    ]
    lines += [f"- {k}: {a} / {b} / {c}" for k, (a, b, c) in PAPER.items()]
    if "originals_trained_share" in table.columns:
        lines += [
            "",
            "Share of originals actually sampled in training: "
            + ", ".join(f"{r['variant']} {r['originals_trained_share']:.0%}" for _, r in table.iterrows()),
        ]
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, path: Path) -> None:
    """Grouped bars of mean rank (log scale) per variant kind for the headline methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = headline_methods(_methods(table))
    x = np.arange(len(table))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, m in enumerate(methods):
        ax.bar(x + i * width - 0.4 + width / 2, table[f"{m}_mean_rank"], width, label=method_label(m))
    ax.set_yscale("log")
    ax.set_xticks(x, table["variant"])
    ax.set_ylabel("average rank of the original (log; 1 = top)")
    ax.set_title("Copyright experiment: where does the original rank?")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def run_copyright(exp: CopyrightExperiment) -> ExperimentResult:
    """Run the whole experiment and write OUT/table.csv, OUT/table.md, OUT/ranks.csv, OUT/ranks.png."""
    started = time.time()
    exp.out.mkdir(parents=True, exist_ok=True)
    docs, targets, pool, records, val_paths = _plan(exp)
    exclude = (
        [] if exp.pool_corpus else sorted(d.doc_id for d in pool)
    )  # an outside pool is never in training
    originals = [t.doc_id for t in targets]
    set_size = max(pd.Series([r["meta"]["variant"] for r in records]).value_counts())
    run_dirs = {o: _train(exp, o, val_paths, exclude, originals, int(set_size)) for o in exp.orders}
    return rank_runs(exp, run_dirs, docs, targets, pool, records, started)


def rank_runs(
    exp: CopyrightExperiment,
    run_dirs: dict[int, Path],
    docs: Sequence,
    targets: Sequence,
    pool: Sequence,
    records: Sequence[dict],
    started: float,
) -> ExperimentResult:
    """Rank the originals under every view of the finished runs (one per order) and the text
    baselines; write OUT/table.csv, table.md, ranks.csv, ranks.png and experiment.json."""
    originals = [t.doc_id for t in targets]
    first = next(iter(run_dirs.values()))
    train_ids = RunDir(first).table(DOCS, ["doc_id"], required=True)["doc_id"].tolist()
    text_of = {d.doc_id: d.text for d in docs}
    missing = [t.doc_id for t in targets if t.doc_id not in set(train_ids)]
    if missing:
        raise UserError(f"originals missing from the run's training documents: {', '.join(missing[:5])}")
    ranks = pd.DataFrame(
        [
            {
                "variant": r["meta"]["variant"],
                "id": r["id"],
                "target_id": r["meta"]["target_id"],
                **{k: r["meta"][k] for k in ("containment_8", "jaccard_3", "cosine_minilm")},
            }
            for r in records
        ]
    )
    for order, run_dir in run_dirs.items():
        by_view, seen = _irs_ranks(run_dir, order, records, train_ids, originals)
        for column, values in by_view.items():
            ranks[column] = values
        ranks["target_seen"] = seen
    for name, values in _text_ranks(records, [text_of[i] for i in train_ids], train_ids, originals).items():
        ranks[name] = values

    table = summarize(ranks, len(train_ids))
    manifest = Manifest.read(first)
    meta = {
        "n_train_docs": len(train_ids),
        "preset": exp.preset,
        "steps": manifest.total_steps,
        "optimizer": exp.optimizer,
        "optimizer_aware": bool(manifest.config.get("optimizer_aware")),
        "seed": exp.seed,
    }
    markdown = to_markdown(table, meta)
    with atomic_path(exp.out / "table.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(exp.out / "ranks.csv") as tmp:
        ranks.to_csv(tmp, index=False)
    with atomic_write(exp.out / "table.md") as fh:
        fh.write(markdown)
    plot(table, exp.out / "ranks.png")
    seconds = time.time() - started
    summary = {
        **meta,
        "seconds": round(seconds, 1),
        "orders": list(exp.orders),
        "kinds": list(table["variant"]),
        "originals": originals,
        "handwritten": {"originals": list(map(str, exp.originals)), "variants": list(map(str, exp.variants))}
        if exp.originals
        else None,
        "heldout_pool": len(pool),
        "pool_corpus": exp.pool_corpus,
        "distances": distance_summary(records),
        "runs": {str(o): str(p) for o, p in run_dirs.items()},
    }
    with atomic_write(exp.out / "experiment.json") as fh:
        json.dump(summary, fh, indent=2)
    return ExperimentResult(table, ranks, markdown, seconds, run_dirs)


def select_targets(ranks: pd.DataFrame, patterns: Sequence[str]) -> pd.DataFrame:
    """The rows of `ranks` whose original's id matches any shell-style pattern (`hw-b-*`); all rows
    for no pattern. Why: a table for a held-out half must come from the same run as the tuning half's."""
    if not patterns:
        return ranks
    ids = ranks["target_id"].astype(str)
    keep = np.zeros(len(ranks), dtype=bool)
    for pattern in patterns:
        keep |= ids.map(lambda i, p=pattern: fnmatch.fnmatchcase(i, p)).to_numpy(dtype=bool)
    if not keep.any():
        raise UserError(f"no variant's target id matches {', '.join(map(repr, patterns))}")
    return ranks[keep]


def table_for(out: Path, targets: Sequence[str] = (), each: bool = True) -> tuple[pd.DataFrame, str]:
    """The table (and its markdown) of the finished experiment in `out`, recomputed from `ranks.csv`
    for the variants whose original matches `targets` (`select_targets`); nothing is retrained."""
    out = Path(out)
    for name in ("ranks.csv", "experiment.json"):
        if not (out / name).is_file():
            raise UserError(
                f"{out}: no {name}; is this a finished `attribution experiment copyright` folder?"
            )
    ranks = pd.read_csv(out / "ranks.csv", dtype={"id": str, "target_id": str, "variant": str})
    meta = json.loads((out / "experiment.json").read_text(encoding="utf-8"))
    chosen = select_targets(ranks, targets)
    table = summarize(chosen, int(meta["n_train_docs"]))
    if targets:
        n = chosen["target_id"].nunique()
        meta["subset"] = (
            f"matching {', '.join(f'`{t}`' for t in targets)} ({n} originals, {len(chosen)} variants)"
        )
    return table, to_markdown(table, meta, each=each)
