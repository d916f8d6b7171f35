"""Build a royalty-style contribution report from one run (or several seeds of it).

`build_report` reads the run directory (and optionally the analysis layer's compare directory),
computes per-document values, applies the royalty rule per document, sums per source and per
owner, and writes `report.html`, `report.md`, `sources.csv`, `owners.csv` and `figures/*.png`.
The CSV and Markdown files contain no timestamps and use fixed number formats, so the same
inputs give byte-identical files.
"""

from __future__ import annotations

import csv
import io
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np
import pandas as pd

from attribution.errors import UserError
from attribution.io import atomic_path, atomic_write
from attribution.report import evidence as evidence_mod
from attribution.report import figures, html, markdown, tables
from attribution.report.model import Figure, GroupTable, ReportModel, TopDoc
from attribution.report.royalty import DEFAULT_RULE, get_rule
from attribution.report.rundata import Run, choose_val_sets, load_run
from attribution.values import Manifest

GROUPINGS = ("source", "owner")
CSV_NAMES = {"source": "sources.csv", "owner": "owners.csv"}
TOP_GROUPS = 10
TOP_DOCS_PER_GROUP = 3
SNIPPET = 160


@dataclass
class ReportResult:
    """What was written and the headline numbers (for callers and tests)."""

    out: Path
    files: list[Path]
    rule: str
    val_sets: list[str]
    pool: Decimal
    currency: str
    ci_method: str
    seconds: float
    tables: dict[str, pd.DataFrame]

    @property
    def html(self) -> Path:
        return self.out / "report.html"

    @property
    def markdown(self) -> Path:
        return self.out / "report.md"


def _csv_cell(text: str) -> str:
    """Neutralize spreadsheet formulas in untrusted names (a leading = + - @ would run in Excel)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv_bytes(by: str, columns: list[str], rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([by] + columns)
    for r in rows:
        w.writerow([_csv_cell(r[by])] + [r[c] for c in columns])
    return buf.getvalue()


def _parse_pool(pool: float | str | Decimal) -> Decimal:
    try:
        d = Decimal(str(pool))
    except InvalidOperation:
        raise UserError(f"--pool must be a number, got {pool!r}") from None
    if not d.is_finite() or d <= 0:
        raise UserError(f"--pool must be a positive amount, got {pool}")
    return d.quantize(Decimal("0.01"))


def _snippet(text: str, limit: int = SNIPPET) -> str:
    s = " ".join(text.split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _fmt_seconds(s) -> str:
    try:
        s = float(s)
    except (TypeError, ValueError):
        return "not recorded"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _optimizer_mode(m: Manifest) -> tuple[str, bool | None]:
    mode = m.training.values
    aware = m.optimizer_aware
    name = m.training.optimizer or m.config.get("optimizer")
    if isinstance(mode, str):
        text = {
            "sgd-proxy": "SGD proxy (values use the SGD step formula)",
            "sgd": "SGD (values use the SGD step formula, the step taken)",
            "adam-aware": "optimizer-aware (Adam-preconditioned values)",
        }.get(mode, mode)
    elif aware is not None:
        text = (
            "optimizer-aware (Adam-preconditioned values)"
            if aware
            else "SGD proxy (values use the SGD step formula)"
        )
    else:
        text = "not recorded"
    if isinstance(name, str):
        text += f"; training optimizer: {name}"
    return text, (bool(aware) if aware is not None else None)


def _model_text(m: Manifest) -> str:
    parts = [f"preset {v}" if k == "preset" else f"{k}={v}" for k, v in m.model().items()]
    return "GPT-2 (" + ", ".join(parts) + ")" if parts else "not recorded"


def _listed(v) -> str:
    return ", ".join(str(x) for x in v) if isinstance(v, list | tuple) else str(v)


def _time_text(m: Manifest) -> str:
    train, started, finished = m.timings.train_seconds, m.timings.started, m.timings.finished
    text = _fmt_seconds(train)
    if isinstance(started, int | float) and isinstance(finished, int | float):
        text += f" training; {_fmt_seconds(finished - started)} wall clock for the whole run"
    return text


def _steps(run: Run) -> int | None:
    s = run.manifest.total_steps
    if s is not None:
        return s
    log = run.train_log()
    return int(log.step.max()) if log is not None and "step" in log and len(log) else None


def build_report(
    run_dirs: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    by: str = "source",
    pool: float | str | Decimal = 100,
    currency: str = "units",
    rule: str = DEFAULT_RULE,
    val_set: str | Sequence[str] | None = None,
    compare_dir: str | Path | None = None,
    n_boot: int = 200,
    top_k: int = 5,
    max_examples: int = 20,
    semantic: bool = True,
    seed: int = 0,
) -> ReportResult:
    """Write the report for `run_dirs` (several = several seeds of one run) into `out`.

    `by` picks the lead table; `pool`/`currency` the amount split by `rule` (see `royalty.RULES`);
    `val_set` the validation set(s) the royalty is based on (all summed when None); `compare_dir` an
    `attribution compare` output whose evidence is shown per example. `n_boot` bootstrap replicates
    (random `seed`) give the confidence intervals; `top_k` documents are shown for up to
    `max_examples` validation examples; `semantic=False` skips MiniLM similarity.
    """
    t0 = time.perf_counter()
    if by not in GROUPINGS:
        raise UserError(f"--by must be one of {', '.join(GROUPINGS)}, got {by!r}")
    paths = [Path(run_dirs)] if isinstance(run_dirs, str | Path) else [Path(p) for p in run_dirs]
    if not paths:
        raise UserError("no run directory given")
    if len({p.resolve() for p in paths}) != len(paths):
        raise UserError("the same run directory is given twice")
    the_rule = get_rule(rule)
    pool_d = _parse_pool(pool)
    runs = [load_run(p) for p in paths]
    requested = [val_set] if isinstance(val_set, str) else (list(val_set) if val_set else None)
    sets = choose_val_sets(runs, requested)
    out = Path(out)

    dv = tables.doc_values(runs, sets)
    shares = tables.doc_shares(dv, the_rule)
    codes = {g: tables.group_codes(dv.docs, g) for g in GROUPINGS}

    per_run_group = None
    if len(runs) > 1:
        ci_method = (
            f"{n_boot} bootstrap replicates over the {len(runs)} runs (random seed {seed}): runs "
            "resampled with replacement, document values averaged, the rule applied, shares summed per group; "
            "95% percentile interval of the share"
        )
        reps = tables.bootstrap_seeds(
            dv, the_rule, [codes[g][0] for g in GROUPINGS], n_boot=n_boot, seed=seed
        )
        per_run_shares = np.vstack([the_rule.shares(v) for v in dv.per_run])
        per_run_group = {
            g: np.vstack(
                [
                    np.bincount(codes[g][0], weights=np.nan_to_num(s), minlength=len(codes[g][1]))
                    for s in per_run_shares
                ]
            )
            for g in GROUPINGS
        }
    else:
        steps = runs[0].optional("step_values.parquet", ["step", "doc_id", "val_set", "value"])
        if steps is not None and not steps.empty:
            steps = steps[steps.val_set.astype(str).isin(sets)]
            n_steps = steps.step.nunique()
            ci_method = (
                f"{n_boot} bootstrap replicates over the {n_steps} training steps (random seed {seed}): "
                "steps resampled with replacement, each document's value recomputed from its per-step values, the rule "
                "applied, shares summed per group; 95% percentile interval of the share"
            )
            reps = tables.bootstrap_steps(
                steps, dv, the_rule, [codes[g][0] for g in GROUPINGS], n_boot=n_boot, seed=seed
            )
        else:
            ci_method = "not available: the run has no step_values.parquet and only one run was given"
            reps = None

    tabs: dict[str, pd.DataFrame] = {}
    group_tables: list[GroupTable] = []
    for i, g in enumerate(GROUPINGS):
        ci = tables.ci_bounds(reps[i]) if reps is not None else None
        t = tables.group_table(
            dv, shares, g, codes[g][0], codes[g][1], pool_d, ci, per_run_group[g] if per_run_group else None
        )
        tabs[g] = t
        group_tables.append(
            GroupTable(
                by=g,
                csv_name=CSV_NAMES[g],
                columns=[c for c in t.columns if c != g],
                rows=tables.format_table(t),
            )
        )
    group_tables.sort(key=lambda t: t.by != by)

    # Top documents per group of the lead grouping (groups in table order).
    lead = tabs[by]
    groups = list(lead[by][:TOP_GROUPS])
    d = dv.docs[dv.docs[by].isin(groups)].assign(share=shares[dv.docs[by].isin(groups).to_numpy()])
    d = d.sort_values([by, "value", "doc_id"], ascending=[True, False, True], kind="mergesort")
    d = d.groupby(by, sort=False).head(TOP_DOCS_PER_GROUP)
    d[by] = pd.Categorical(d[by], categories=groups, ordered=True)
    d = d.sort_values([by, "value", "doc_id"], ascending=[True, False, True], kind="mergesort")
    texts = runs[0].texts(d.doc_id)
    top_docs = [
        TopDoc(
            group=str(r[by]),
            doc_id=r["doc_id"],
            value=tables.fmt("value", r["value"]),
            share=tables.fmt("share", r["share"]),
            snippet=_snippet(texts[r["doc_id"]]),
        )
        for r in d.to_dict("records")
    ]

    figs = _figures(runs, sets, dv, tabs, top_docs)
    ev, score_col = evidence_mod.collect(
        runs[0],
        sets,
        top_k=top_k,
        max_examples=max_examples,
        compare_dir=Path(compare_dir) if compare_dir else None,
        semantic=semantic,
    )

    command = _command(
        paths,
        by,
        pool_d,
        currency,
        the_rule.name,
        requested,
        compare_dir,
        n_boot,
        max_examples,
        semantic,
        top_k,
        seed,
    )
    model = ReportModel(
        title=f"Training-data contribution and royalty report: {', '.join(r.name for r in runs)}",
        summary=_summary(runs, sets, the_rule.name, pool_d, currency)
        + [("Reproduce with (OUT: any output folder)", command)],
        rule_name=the_rule.name,
        rule_description=the_rule.description,
        basis=_basis(runs, sets, requested, ci_method, pool_d, currency),
        column_notes=_column_notes(len(runs) > 1),
        tables=group_tables,
        figures=figs,
        top_docs_by=by,
        top_docs=top_docs,
        evidence=ev,
        evidence_score="attribution score" if score_col == "attribution" else "Shapley value",
        evidence_note=_evidence_note(ev, score_col, compare_dir, semantic, top_k, max_examples, len(runs)),
        limitations=_limitations(runs, sets, dv, tabs["source"], reps is not None),
    )

    files = _write(out, model, group_tables)
    seconds = time.perf_counter() - t0
    print(f"report written to {out} in {seconds:.1f} s", file=sys.stderr)
    return ReportResult(
        out=out,
        files=files,
        rule=the_rule.name,
        val_sets=sets,
        pool=pool_d,
        currency=currency,
        ci_method=ci_method,
        seconds=seconds,
        tables=tabs,
    )


def _command(
    paths, by, pool, currency, rule, requested, compare_dir, n_boot, max_examples, semantic, top_k, seed
) -> str:
    """The command line that rebuilds this report byte for byte (from the same run and code version).

    The output folder is written as OUT, so that the report does not depend on where it was written.
    """
    q = shlex.quote
    parts = ["attribution", "report", q(str(paths[0]))]
    if len(paths) > 1:
        parts += ["--runs", *(q(str(p)) for p in paths[1:])]
    parts += ["--out", "OUT", "--by", by, "--pool", f"{pool:.2f}", "--currency", q(currency), "--rule", rule]
    for v in requested or []:
        parts += ["--val-set", q(v)]
    if compare_dir:
        parts += ["--compare", q(str(compare_dir))]
    parts += ["--bootstrap", str(n_boot), "--examples", str(max_examples)]
    if not semantic:
        parts.append("--no-semantic")
    extra = [f"{k}={v}" for k, v, d in (("top_k", top_k, 5), ("seed", seed, 0)) if v != d]
    text = " ".join(parts)
    return text + (f" (Python API arguments: {', '.join(extra)})" if extra else "")


def _write(out: Path, model: ReportModel, group_tables: list[GroupTable]) -> list[Path]:
    files = []
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for t in group_tables:
        p = out / t.csv_name
        with atomic_write(p) as fh:
            fh.write(_csv_bytes(t.by, t.columns, t.rows))
        files.append(p)
    for f in model.figures:
        p = out / "figures" / f"{f.name}.png"
        with atomic_path(p) as tmp:
            tmp.write_bytes(f.png)
        files.append(p)
    for name, text in (("report.md", markdown.render(model)), ("report.html", html.render(model))):
        with atomic_write(out / name) as fh:
            fh.write(text)
        files.append(out / name)
    return files


def _figures(
    runs: list[Run],
    sets: list[str],
    dv: tables.DocValues,
    tabs: dict[str, pd.DataFrame],
    top_docs: list[TopDoc],
) -> list[Figure]:
    figs = []
    stage = runs[0].optional(
        "stage_values.parquet", ["window_start", "window_end", "source", "val_set", "value"]
    )
    if stage is not None and not stage.empty:
        stage = stage[stage.val_set.astype(str).isin(sets)]
        figs.append(
            Figure(
                "stage_shares",
                "Source shares over training",
                "Per training window, each source's summed value is clipped at zero and divided by the window's "
                "total, from stage_values.parquet"
                + (" of the first run" if len(runs) > 1 else "")
                + ". Values shrink as training goes on, so early windows weigh more in the royalty totals than the "
                "lines suggest.",
                figures.stage_shares(stage, list(tabs["source"]["source"])),
            )
        )
    values = dv.docs.value.to_numpy()
    figs.append(
        Figure(
            "value_distribution",
            "Distribution of document values",
            f"Document values (raw value summed over the chosen validation sets). Negative values (red) mean the "
            f"document raised validation loss; {(values < 0).mean():.1%} of documents are negative, "
            f"{(values == 0).mean():.1%} are exactly zero (typically never trained on).",
            figures.value_distribution(values),
        )
    )
    if top_docs:
        figs.append(
            Figure(
                "top_documents",
                "Top documents per group",
                "The highest-valued documents of the groups with the largest shares, with the start of their text.",
                figures.top_documents([(t.group, t.doc_id, float(t.value), t.snippet) for t in top_docs]),
            )
        )
    return figs


def _summary(
    runs: list[Run], sets: list[str], rule: str, pool: Decimal, currency: str
) -> list[tuple[str, str]]:
    m = runs[0].manifest
    val = runs[0].val_sets()
    order = m.order
    opt_text, _ = _optimizer_mode(m)
    seeds = [r.manifest.seed for r in runs]
    corpus = m.corpus.specs
    fp = m.corpus.fingerprint
    docs = runs[0].docs
    set_texts = []
    for name in sorted(set(val) | set(runs[0].doc_values.val_set.unique())):
        size = len(val.get(name, [])) or (m.val_sets[name].n_docs if name in m.val_sets else None)
        used = "used" if name in sets else "not used"
        set_texts.append(f"{name} ({size if size else '?'} examples, {used})")
    return [
        ("Run" if len(runs) == 1 else "Runs (seeds)", "; ".join(str(r.path) for r in runs)),
        (
            "Corpus",
            f"{_listed(corpus) if corpus else 'not recorded'}; fingerprint {fp or 'not recorded'}; "
            f"{len(docs)} documents, {int(docs.n_tokens.sum())} tokens",
        ),
        ("Model", _model_text(m)),
        ("Training steps", "; ".join(str(_steps(r)) for r in runs)),
        ("Validation sets", "; ".join(set_texts)),
        ("Time taken (training run)", "; ".join(_time_text(r.manifest) for r in runs)),
        (
            "Approximation order",
            {1: "first-order Taylor", 2: "second-order Taylor"}.get(order, str(order))
            if order is not None
            else "not recorded",
        ),
        ("Optimizer mode", opt_text),
        ("Seed(s)", ", ".join(str(s) for s in seeds)),
        ("Code version", str(m.git_commit or "not recorded")),
        ("Royalty rule", rule),
        ("Royalty pool", f"{pool:.2f} {currency}"),
    ]


def _basis(runs, sets, requested, ci_method, pool, currency) -> list[str]:
    which = (
        f"the validation set(s) {', '.join(sets)}"
        if requested
        else f"all validation sets summed ({', '.join(sets)}), because no --val-set was given"
    )
    out = [
        f"A document's value is the In-Run Data Shapley value recorded by the run: the sum, over the training "
        f"steps in which the document was in the batch, of its estimated reduction of the validation loss. "
        f"Positive means the document helped. It is summed over {which}.",
        "Royalty tables always use this additive raw value column, never a normalized or other view, "
        "because only raw values add up across documents, steps and validation examples.",
        "Owner and source totals are sums of per-document values, and the royalty rule is applied to each "
        "document before summing. Relabelling documents (for example splitting one owner into several shell "
        "owners) therefore cannot change what is paid for them.",
        f"Royalties split the pool of {pool:.2f} {currency} by share and are rounded to cents so that they sum "
        f"exactly to the pool (largest-remainder rounding).",
        f"Confidence intervals: {ci_method}.",
    ]
    if len(runs) > 1:
        out.append(
            f"{len(runs)} runs (seeds) were merged: each document's value is the mean of its values in "
            "the runs (0 in a run that never trained on it); share_seed_sd is the standard deviation "
            "of a group's share across the runs."
        )
    return out


def _column_notes(multi: bool) -> list[tuple[str, str]]:
    notes = [
        ("n_docs", "documents of the group in the corpus."),
        ("n_tokens", "their tokens (GPT-2 tokenizer)."),
        ("value", "sum of the documents' raw values (see above); the loss reduction they are credited with."),
        ("value_per_token", "value divided by n_tokens."),
        ("share", "fraction of the pool under the royalty rule (sum of the documents' shares), 6 decimals."),
        ("royalty", "share times the pool, in cents, rounded so the column sums to the pool."),
        (
            "neg_fraction",
            "fraction of the group's documents whose value is negative (they raised validation loss).",
        ),
        (
            "ci_low, ci_high",
            "95% bootstrap interval of the share (see 'Confidence intervals' above); empty when "
            "not available.",
        ),
    ]
    if multi:
        notes.append(("share_seed_sd", "standard deviation of the share across the merged runs (seeds)."))
    notes.append(
        (
            "names in the CSV files",
            "a name that starts with = + - or @ is written with a leading ' so a "
            "spreadsheet shows it as text instead of running it as a formula.",
        )
    )
    return notes


def _evidence_note(ev, score_col, compare_dir, semantic, top_k, max_examples, n_runs) -> str:
    if max_examples == 0:
        return "Per-example evidence was not requested (--examples 0)."
    if not ev:
        return "The run has no per-example values (example_values.parquet), so this section is empty."
    rank = "the run's attribution column" if score_col == "attribution" else "the raw per-example value"
    src = (
        f"n-gram containment, longest shared span, semantic similarity and label from the comparison in "
        f"{compare_dir}"
        if compare_dir
        else "8-gram containment and shared spans computed from the texts; semantic similarity is the cosine of "
        "all-MiniLM-L6-v2 embeddings"
        + ("" if semantic else " (not computed for this report)")
        + "; no analysis label, because no --compare directory was given"
    )
    return (
        f"For up to {max_examples} validation examples, the {top_k} training documents with the highest "
        f"score ({rank}; rank 1 = most helpful). Evidence: {src}. Highlighted text is shared word for word "
        f"(8 or more consecutive words) with the validation example."
        + (" Per-example values come from the first run." if n_runs > 1 else "")
    )


def _limitations(runs, sets, dv, src_table, have_ci) -> list[str]:
    m = runs[0].manifest
    out = []
    order = m.order
    log = runs[0].train_log()
    lr = float(log.lr.max()) if log is not None and "lr" in log and len(log) else None
    lr_text = f" The run's peak learning rate was {lr:.3g}." if lr is not None else ""
    if order == 1:
        out.append(
            "Values use a first-order Taylor approximation of each step's effect on validation loss; "
            "its error grows with the square of the learning rate. The method's authors measured rank "
            "agreement with exact Shapley of 0.99 (Spearman) at learning rate 6e-4 and 0.79 at 5e-3."
            + lr_text
        )
    elif order == 2:
        out.append(
            "Values use a second-order Taylor approximation of each step's effect (error of the order of "
            "the learning rate cubed)." + lr_text
        )
    else:
        out.append(
            "The run does not record its Taylor approximation order; the accuracy of the values cannot be "
            "stated."
        )
    _, aware = _optimizer_mode(m)
    if aware is False:
        out.append(
            "Values are computed with the plain SGD step formula while the model was trained with an "
            "adaptive optimizer (SGD as a proxy). A published study found weak agreement (Pearson about "
            "0.11) between such proxy values and true contributions under Adam; treat small differences "
            "between owners with caution."
        )
    elif aware:
        out.append(
            "Values are optimizer-aware (they use Adam's per-parameter step scaling). Momentum carries a "
            "document's gradient into later steps; unless the run says otherwise, that carry-over is not "
            "credited to the document."
        )
    else:
        out.append("The run does not record whether values are optimizer-aware or use SGD as a proxy.")
    seen = dv.docs.n_seen.to_numpy()
    if seen.any():
        # n_seen counts training sequences; a document cut into k sequences is one full pass per k.
        seqs = dv.docs.n_seqs.to_numpy(dtype=np.float64) if "n_seqs" in dv.docs else np.ones(len(seen))
        passes = seen / np.maximum(seqs, 1)
        never = float((seen == 0).mean())
        once = float(((passes > 0) & (passes <= 1)).mean())
        out.append(
            f"Documents were trained on {np.median(passes):.3g} times (median number of passes over the "
            f"document; mean {passes.mean():.3g}). {never:.1%} were never trained on and have value 0, "
            f"which is not evidence that they could not have contributed; {once:.1%} were seen at most "
            f"once, so their value rests on very few training steps."
        )
    sizes = {k: len(v) for k, v in runs[0].val_sets().items()}
    used = ", ".join(f"{k}: {sizes.get(k, '?')} examples" for k in sets)
    out.append(
        f"Values measure contribution to the chosen validation texts only ({used}); a small or narrow "
        "validation set can favour the few sources that resemble it. Other uses of the model are not "
        "covered."
    )
    neg = float((dv.docs.value < 0).mean())
    out.append(
        f"{neg:.1%} of documents have negative values; the rule decides how they are treated (see above)."
    )
    if not have_ci:
        out.append("No confidence intervals could be computed (no per-step values and a single run).")
    elif len(runs) == 1:
        out.append(
            "Confidence intervals reflect which training steps happened to be sampled, not variation "
            "between training runs with different seeds or data orders; give several runs to see that."
        )
    return out
