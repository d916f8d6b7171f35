"""A small Python API for exploring one run in a notebook.

The legal-review notebook (`notebooks/legal_review.ipynb`) calls only these functions, so that every
figure a reviewer sees is computed by tested package code, never by logic pasted into a cell. The
module only reads the run directory, through `attribution.values` (see `docs/architecture.md`); it writes
nothing there.

Sign convention: a positive value means the training document *lowered* validation loss (helped).
"""

from __future__ import annotations

import html
import os
import warnings
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd

from attribution.errors import UserError
from attribution.io import atomic_path
from attribution.values import Manifest, RunDir, RunValues
from attribution.values.manifest import ATTRIBUTION_COLUMN
from attribution.values.rundir import DOC_VALUES, DOCS, STAGE_VALUES

with warnings.catch_warnings():
    # tqdm.auto (imported by the report package) warns in a Jupyter kernel without ipywidgets; the
    # notebook's widgets are optional, so that warning is noise for a reviewer.
    warnings.filterwarnings("ignore", message="IProgress not found")
    from attribution.report.evidence import SPAN_N
    from attribution.report.royalty import DEFAULT_RULE
from attribution.analysis.overlap import evidence as pair_evidence

RUN_ENV = "ATTRIBUTION_RUN"
DOC_COLUMNS = ("doc_id", "source", "owner", "license", "n_tokens")


@dataclass
class Run:
    """Everything a reviewer needs from one run directory, as DataFrames.

    Optional files (`example_values`, `stage_values`, `train_log`) are empty DataFrames when the run
    did not write them, so a notebook cell degrades to "nothing to show" instead of failing.
    `example_values` holds the raw per-example values and every attribution view the run allows
    (`view_<name>` columns, `attribution` = the run's default view), computed when the run is read.
    """

    path: Path
    manifest: Manifest
    docs: pd.DataFrame
    doc_values: pd.DataFrame
    example_values: pd.DataFrame
    stage_values: pd.DataFrame
    train_log: pd.DataFrame
    val_sets: dict[str, pd.DataFrame] = field(default_factory=dict)
    values: RunValues | None = field(default=None, repr=False)

    @property
    def val_set_names(self) -> list[str]:
        names = list(self.val_sets) or sorted(self.doc_values["val_set"].unique())
        return names

    @property
    def default_view(self) -> str:
        """The example-level column the run recommends ranking by: `attribution` (the manifest's default
        view, `Manifest.default_view`), or the raw `value` when the run has no per-example values."""
        return ATTRIBUTION_COLUMN if ATTRIBUTION_COLUMN in self.example_values.columns else "value"


def repo_root() -> Path | None:
    """The source checkout this package runs from, if any (editable installs, notebooks in the repo)."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").is_file() else None


def default_run_dir() -> Path:
    """`$ATTRIBUTION_RUN` when set, else the demo run `runs/demo` at the repository root.

    The notebook calls this so that tests (and reviewers) can point it at any run without editing it.
    """
    env = os.environ.get(RUN_ENV)
    if env:
        return Path(env).expanduser()
    root = repo_root() or Path.cwd()
    return root / "runs" / "demo"


def _frame(rd: RunDir, name: str, columns: tuple[str, ...], required: bool = False) -> pd.DataFrame:
    """One table of the run (every column), checked for `columns`; an absent optional one is empty."""
    frame = rd.table(name, required=required, needs=columns)
    return pd.DataFrame(columns=list(columns)) if frame is None else frame


def _val_frame(texts: list) -> pd.DataFrame:
    """A validation set as a DataFrame: `val_id, text` plus one column per `meta` key."""
    return pd.DataFrame([{"val_id": t.id, "text": t.text, **t.meta} for t in texts])


def load_run(path: str | os.PathLike | None = None) -> Run:
    """Read a run directory into a `Run`. Raises `UserError` when it is not a run directory."""
    run_dir = Path(path) if path is not None else default_run_dir()
    if not run_dir.is_dir():
        raise UserError(
            f"{run_dir}: no such run directory (run `make demo`, or set {RUN_ENV} to a run directory)"
        )
    rd = RunDir(run_dir)
    manifest = rd.manifest(required=False)
    docs = _frame(rd, DOCS, ("doc_id", "source"), required=True)
    doc_values = _frame(rd, DOC_VALUES, ("doc_id", "source", "val_set", "value"), required=True)
    values = RunValues.read(rd, docs=docs, doc_values=doc_values, default_view=manifest.default_view)
    example_values = (
        values.with_views()
        if values.has_examples()
        else pd.DataFrame(columns=["doc_id", "val_set", "val_id", "value"])
    )
    stage_values = _frame(rd, STAGE_VALUES, ("window_start", "window_end", "source", "val_set", "value"))
    train_log = rd.train_log()
    if train_log is None:
        train_log = pd.DataFrame(columns=["step"])
    val_sets = {name: _val_frame(texts) for name, texts in rd.val_sets().items()}
    return Run(run_dir, manifest, docs, doc_values, example_values, stage_values, train_log, val_sets, values)


def _pick_val_set(run: Run, val_set: str | None) -> str | None:
    """None means "all validation sets" (values add up across sets: Shapley is linear)."""
    if val_set is None:
        return None
    known = set(run.doc_values["val_set"].unique())
    if val_set not in known:
        raise UserError(f"unknown validation set {val_set!r}; this run has: {', '.join(sorted(known))}")
    return val_set


def describe(run: Run) -> pd.Series:
    """One line per headline fact of the run, for the top of a notebook."""
    cfg = run.manifest.config
    totals = doc_totals(run)
    return pd.Series(
        {
            "run directory": str(run.path),
            "training documents": len(run.docs),
            "sources": run.docs["source"].nunique(),
            "validation sets": ", ".join(run.val_set_names),
            "steps": cfg.get("steps", run.train_log["step"].max() if len(run.train_log) else None),
            "documents that helped (value > 0)": int((totals["value"] > 0).sum()),
            "documents that hurt (value < 0)": int((totals["value"] < 0).sum()),
        },
        name="run",
    )


def doc_totals(run: Run, val_set: str | None = None) -> pd.DataFrame:
    """Per-document value for one validation set, or summed over all of them (`val_set=None`)."""
    val_set = _pick_val_set(run, val_set)
    values = run.values or RunValues.read(run.path, docs=run.docs, doc_values=run.doc_values)
    out = values.to_dataframe(val_set)
    out = out[[c for c in (*DOC_COLUMNS, "value") if c in out.columns]]
    return out.sort_values("value", ascending=False, kind="stable").reset_index(drop=True)


def source_table(run: Run, val_set: str | None = None) -> pd.DataFrame:
    """Per source: total value, documents, and the share of all positive value ("which sources drove it")."""
    totals = doc_totals(run, val_set)
    table = totals.groupby("source").agg(
        documents=("doc_id", "size"),
        value=("value", "sum"),
        helped=("value", lambda v: int((v > 0).sum())),
        hurt=("value", lambda v: int((v < 0).sum())),
    )
    positive = totals["value"].clip(lower=0).groupby(totals["source"]).sum()
    denom = positive.sum()
    table["share_of_positive_value"] = positive / denom if denom > 0 else 0.0
    return table.sort_values("value", ascending=False).reset_index()


def source_shares_over_time(run: Run, val_set: str | None = None, normalized: bool = False) -> pd.DataFrame:
    """Value per source per training window: rows are windows (by end step), columns are sources.

    `normalized=True` uses `value_normalized` (each step divided by its validation-loss reduction), which
    keeps early steps, whose raw values are largest, from hiding what happens later in training.
    """
    val_set = _pick_val_set(run, val_set)
    sv = run.stage_values
    if sv.empty:
        return pd.DataFrame()
    col = "value_normalized" if normalized else "value"
    if col not in sv.columns:
        raise UserError(f"stage_values.parquet has no {col!r} column")
    if val_set is not None:
        sv = sv[sv["val_set"] == val_set]
    wide = sv.pivot_table(index="window_end", columns="source", values=col, aggfunc="sum", fill_value=0.0)
    wide.index.name = "step"
    return wide.sort_index()


def plot_source_shares_over_time(run: Run, val_set: str | None = None, normalized: bool = True, ax=None):
    """Line plot of `source_shares_over_time`: one line per source, zero line drawn."""
    import matplotlib.pyplot as plt

    wide = source_shares_over_time(run, val_set, normalized=normalized)
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    for source in wide.columns:
        ax.plot(wide.index, wide[source], marker="o", ms=3, label=str(source))
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("training step (end of window)")
    ax.set_ylabel("value per window" + (" (normalized)" if normalized else ""))
    ax.set_title("Which sources helped, over training" + (f" — {val_set}" if val_set else ""))
    if len(wide.columns):
        ax.legend(fontsize=8, loc="best")
    return ax


def validation_texts(run: Run, val_set: str | None = None) -> pd.DataFrame:
    """All validation texts the run was valued against: `val_set, val_id, text` and their meta fields."""
    frames = []
    for name, df in run.val_sets.items():
        if val_set is None or name == val_set:
            frames.append(df.assign(val_set=name))
    if not frames:
        return pd.DataFrame(columns=["val_set", "val_id", "text"])
    out = pd.concat(frames, ignore_index=True)
    first = ["val_set", "val_id", "text"]
    return out[first + [c for c in out.columns if c not in first]]


def validation_text(run: Run, val_id: str) -> str:
    texts = validation_texts(run)
    hit = texts[texts["val_id"] == str(val_id)]
    if hit.empty:
        raise UserError(f"no validation text with id {val_id!r} in {run.path}")
    return str(hit["text"].iloc[0])


def pick_validation(run: Run, variant: str | None = None) -> str:
    """The id of a validation text to review: the first with `meta.variant == variant` if given and present,
    else the first validation text that has example-level values."""
    texts = validation_texts(run)
    if texts.empty:
        raise UserError(f"{run.path}: the run has no validation texts (val_sets/*.jsonl)")
    valued = set(run.example_values["val_id"]) if not run.example_values.empty else set(texts["val_id"])
    candidates = texts[texts["val_id"].isin(valued)]
    if candidates.empty:
        raise UserError(f"{run.path}: no validation text has example-level values (example_values.parquet)")
    if variant is not None and "variant" in candidates.columns:
        match = candidates[candidates["variant"] == variant]
        if not match.empty:
            return str(match["val_id"].iloc[0])
    return str(candidates["val_id"].iloc[0])


def _doc_text(run: Run, doc_ids: list[str]) -> dict[str, str]:
    if "text" not in run.docs.columns:
        return {d: "" for d in doc_ids}
    sub = run.docs[run.docs["doc_id"].isin(doc_ids)]
    return dict(zip(sub["doc_id"], sub["text"].fillna("").astype(str), strict=True))


def top_contributors(
    run: Run, val_id: str, k: int = 10, view: str | None = None, evidence: bool = True, n: int = SPAN_N
) -> pd.DataFrame:
    """The `k` training documents with the largest value for one validation text, with evidence.

    `view` is the example-level value column to rank by (default: the run's `default_view`). With
    `evidence=True` each row also carries the lexical evidence (word `n`-gram containment of the
    validation text in the document, longest shared word run) and the MiniLM cosine similarity, so a
    reviewer can see whether a high Shapley value comes with copied wording, shared meaning, or neither.
    """
    ev = run.example_values
    if ev.empty:
        raise UserError(f"{run.path}: no example_values.parquet; per-text values were not recorded")
    view = view or run.default_view
    if view not in ev.columns:
        views = [c for c in ev.columns if c not in ("doc_id", "val_set", "val_id")]
        raise UserError(f"unknown view {view!r}; example_values has: {', '.join(views)}")
    rows = ev[ev["val_id"] == str(val_id)]
    if rows.empty:
        raise UserError(f"no example-level values for validation text {val_id!r}")
    ranked = rows.groupby("doc_id", sort=False)[view].sum().sort_values(ascending=False, kind="stable")
    top = ranked.head(k).rename("shapley").reset_index()
    top.insert(0, "rank", np.arange(1, len(top) + 1))
    meta_cols = [c for c in ("doc_id", "source", "owner", "license") if c in run.docs.columns]
    top = top.merge(run.docs[meta_cols], on="doc_id", how="left")
    top["val_id"] = str(val_id)
    if evidence and len(top):
        query = validation_text(run, val_id)
        texts = _doc_text(run, list(top["doc_id"]))
        top = top.join(evidence_table(query, [texts.get(d, "") for d in top["doc_id"]], n=n))
    return top


def evidence_table(query: str, documents: list[str], n: int = SPAN_N) -> pd.DataFrame:
    """Lexical and semantic evidence of one query text against each document (row order kept).

    The measures are the analysis layer's (`attribution.analysis.overlap.evidence`), which the HTML
    report uses too, so the notebook and the report print the same numbers for the same pair.
    """
    from attribution.embeddings import embed

    pairs = [pair_evidence(query, d, n=n) for d in documents]
    vecs = embed([query, *documents]) if documents else np.zeros((1, 384), dtype=np.float32)
    return pd.DataFrame(
        {
            f"ngram{n}_containment": [p["containment_val_in_doc"] for p in pairs],
            "longest_shared_span": [p["longest_common_span"] for p in pairs],
            "semantic_similarity": (vecs[1:] @ vecs[0]).astype(float) if documents else [],
        }
    )


def highlight(text: str, spans: list[tuple[int, int]], max_chars: int | None = 3000) -> str:
    """HTML of `text` (escaped) with the character `spans` wrapped in `<mark>`.

    Long texts are cut to a window that starts a little before the first highlight, so the evidence
    is on screen.
    """
    lo = 0
    if max_chars is not None and len(text) > max_chars and spans:
        lo = max(0, spans[0][0] - max_chars // 5)
    hi = len(text) if max_chars is None else min(len(text), lo + max_chars)
    pieces, pos = ["… " if lo else ""], lo
    for a, b in spans:
        a, b = max(a, lo), min(b, hi)
        if a >= b:
            continue
        pieces.append(html.escape(text[pos:a]))
        pieces.append(f"<mark>{html.escape(text[a:b])}</mark>")
        pos = b
    pieces.append(html.escape(text[pos:hi]))
    pieces.append(" …" if hi < len(text) else "")
    return "".join(pieces)


def side_by_side(run: Run, val_id: str, doc_id: str, n: int = SPAN_N) -> str:
    """HTML: the validation text and one training document next to each other, word runs of `n`+ words
    found in both highlighted, with the document's Shapley value and evidence scores in the header.
    Display it with `IPython.display.HTML`."""
    query = validation_text(run, val_id)
    doc = _doc_text(run, [str(doc_id)]).get(str(doc_id))
    if doc is None:
        raise UserError(f"no training document {doc_id!r} in {run.path}")
    ev = run.example_values
    value = ev[(ev["val_id"] == str(val_id)) & (ev["doc_id"] == str(doc_id))][run.default_view].sum()
    scores = evidence_table(query, [doc], n=n).iloc[0]
    meta = run.docs[run.docs["doc_id"] == str(doc_id)].iloc[0]
    header = (
        f"<b>{html.escape(str(doc_id))}</b> ({html.escape(str(meta.get('source', '')))}, owner "
        f"{html.escape(str(meta.get('owner', 'unknown')))}): Shapley {value:+.4g}; "
        f"{n}-gram containment {scores[f'ngram{n}_containment']:.2f}; "
        f"longest shared span {int(scores['longest_shared_span'])} words; "
        f"semantic similarity {scores['semantic_similarity']:.2f}"
    )
    cell = "vertical-align:top;padding:6px;border:1px solid #ccc;white-space:pre-wrap;font-size:12px"
    spans = pair_evidence(query, doc, n=n)
    return (
        f"<div>{header}</div><table style='width:100%;table-layout:fixed'><tr>"
        f"<th>validation text {html.escape(str(val_id))}</th><th>training document</th></tr><tr>"
        f"<td style='{cell}'>{highlight(query, spans['val_spans'])}</td>"
        f"<td style='{cell}'>{highlight(doc, spans['doc_spans'])}</td>"
        "</tr></table>"
    )


def royalty_table(
    run: Run, pool: float = 100_000.0, by: str = "owner", rule: str = DEFAULT_RULE, val_set: str | None = None
) -> pd.DataFrame:
    """Split a royalty `pool` among owners (or sources) exactly as `attribution report` does.

    Rules are per document (`attribution.report.royalty.RULES`; default `positive-share`: each document's
    value clipped at zero, divided by the sum of clipped values); a group's payout is the sum of its
    documents', so splitting an owner into "shell" owners cannot raise its payout. Payouts are rounded to
    cents and add up exactly to the pool.
    """
    from attribution.report import rundata, tables
    from attribution.report.royalty import get_rule

    if by not in ("owner", "source"):
        raise UserError(f"royalties are split by 'owner' or 'source', not {by!r}")
    chosen = get_rule(rule)
    rrun = rundata.load_run(run.path)
    dv = tables.doc_values([rrun], rundata.choose_val_sets([rrun], [val_set] if val_set else None))
    shares = tables.doc_shares(dv, chosen)
    codes, names = tables.group_codes(dv.docs, by)
    table = tables.group_table(dv, shares, by, codes, names, Decimal(str(pool)), None)
    table = table.drop(columns=["ci_low", "ci_high"]).rename(columns={"royalty": "payout"})
    table["payout"] = table["payout"].astype(float)
    table.attrs["rule"] = chosen.name
    table.attrs["rule_description"] = chosen.description
    return table


def export_selection(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the rows a reviewer selected to CSV (atomically) and return the path written."""
    target = Path(path)
    if df.empty:
        raise UserError("nothing selected: the table to export is empty")
    with atomic_path(target) as tmp:
        df.to_csv(tmp, index=False)
    return target
