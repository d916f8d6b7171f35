"""Data curation by value: drop low-value documents, retrain, and measure the training steps saved.

The paper's first finding was that about 16% of a curated corpus had negative In-Run Shapley values,
and that training without them reached the same validation loss in about 25% fewer iterations.
`attribution curate` lets a practitioner check that on their own corpus. It retrains three times on the
same schedule and seed:

- **baseline**: the full corpus;
- **curated**: without the documents picked by the rule (`negative`, or the bottom PCT% by value);
- **random**: without the same *number* of documents picked uniformly at random (seeded).

The random-drop control matters: removing any data changes the batches and how often each remaining
document is repeated, which alone can move the loss curve. A curation claim is only the gap between
`curated` and `random`, not between `curated` and `baseline`.

Steps-to-target: the target is the baseline's final validation loss (after the same trailing
smoothing as every curve). A run "reaches" it at the first evaluated step whose smoothed loss is at or
below the target; the saving is `1 - steps_curated / steps_baseline`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd

from attribution.errors import UserError
from attribution.io import atomic_path, atomic_write
from attribution.values import Manifest, RunDir, RunValues, read_val_set
from attribution.values.rundir import DOC_VALUES, DOCS

RUN_NAMES = ("baseline", "curated", "random")  # with --controls N: random, random-2, ..., random-N


def control_name(k: int) -> str:
    """Name of the k-th (0-based) random-drop control run."""
    return "random" if k == 0 else f"random-{k + 1}"


@dataclass(frozen=True)
class DropRule:
    """`negative` (value < 0) or `bottom` with `pct` percent of documents (lowest values first)."""

    kind: str
    pct: float | None = None

    def __str__(self) -> str:
        return "negative" if self.kind == "negative" else f"bottom:{self.pct:g}"


def parse_drop(spec: str) -> DropRule:
    """Parse `negative` or `bottom:PCT` (0 < PCT < 100)."""
    spec = spec.strip().lower()
    if spec == "negative":
        return DropRule("negative")
    m = re.fullmatch(r"bottom:([0-9]*\.?[0-9]+)%?", spec)
    if m:
        pct = float(m.group(1))
        if not 0 < pct < 100:
            raise UserError(f"--drop bottom:PCT needs 0 < PCT < 100, got {pct:g}")
        return DropRule("bottom", pct)
    raise UserError(f"--drop must be 'negative' or 'bottom:PCT' (e.g. bottom:10), got {spec!r}")


def document_values(run_dir: Path, val_set: str | None) -> pd.DataFrame:
    """Per-document value from a run: one validation set, or the sum over all of them (Shapley is linear).

    Columns: doc_id, source, owner, n_tokens, value. Documents absent from `doc_values.parquet` (never
    in a batch) get value 0: nothing is known against them.
    """
    RunDir(run_dir).require((DOC_VALUES, DOCS))
    out = RunValues.read(run_dir).to_dataframe(val_set)
    return out[[c for c in ("doc_id", "source", "owner", "n_tokens", "value", "n_seen") if c in out.columns]]


def select_drop(values: pd.DataFrame, rule: DropRule) -> pd.DataFrame:
    """The documents the rule drops, lowest value first (ties broken by doc_id, so it is deterministic)."""
    ordered = values.sort_values(["value", "doc_id"], kind="stable").reset_index(drop=True)
    if rule.kind == "negative":
        return ordered[ordered["value"] < 0].reset_index(drop=True)
    n = int(round(len(ordered) * rule.pct / 100.0))
    return ordered.head(n).reset_index(drop=True)


def random_drop(values: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """`n` documents drawn uniformly without replacement from the whole corpus: the control."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(values), size=n, replace=False))
    return values.iloc[idx].reset_index(drop=True)


def source_breakdown(values: pd.DataFrame, dropped: pd.DataFrame) -> pd.DataFrame:
    """Per source: documents, documents dropped, the fraction of the source dropped and its share of the drop."""
    total = values.groupby("source")["doc_id"].size().rename("documents")
    gone = dropped.groupby("source")["doc_id"].size().rename("dropped")
    out = pd.concat([total, gone], axis=1).fillna(0).astype(int)
    out["fraction_of_source_dropped"] = out["dropped"] / out["documents"]
    out["share_of_dropped"] = out["dropped"] / max(int(out["dropped"].sum()), 1)
    return out.sort_values(["dropped", "documents"], ascending=False).reset_index(names="source")


def val_loss_curve(train_log: pd.DataFrame, val_set: str | None) -> pd.Series:
    """Validation loss by step from a `train_log.csv`: one set's column, or the mean over the sets.

    Rows without an evaluation (NaN) are skipped.
    """
    cols = [c for c in train_log.columns if c.startswith("val_loss")]
    if not cols:
        raise UserError("train_log.csv has no val_loss column; was validation evaluated?")
    if val_set is not None:
        named = [c for c in cols if _set_of_column(c) == val_set]
        if not named and len(cols) == 1:
            named = cols
        if not named:
            raise UserError(f"train_log.csv has no validation loss for set {val_set!r} (columns: {cols})")
        cols = named
    series = train_log.set_index("step")[cols].mean(axis=1, skipna=False).dropna()
    series = series[~series.index.duplicated(keep="last")].sort_index()
    series.name = "val_loss"
    return series


def _set_of_column(col: str) -> str:
    """`val_loss[name]`, `val_loss_name` and `val_loss/name` all name the set `name`."""
    m = re.fullmatch(r"val_loss[\[_/:.](.+?)\]?", col)
    return m.group(1) if m else ""


def smooth(curve: pd.Series, window: int) -> pd.Series:
    """Trailing mean over `window` evaluations (causal: a step never sees later losses)."""
    if window <= 1:
        return curve
    return curve.rolling(window, min_periods=1).mean()


def steps_to_target(curve: pd.Series, target: float) -> int | None:
    """First step whose (already smoothed) loss is <= target; None if the run never gets there."""
    hit = curve[curve <= target + 1e-12]
    return int(hit.index[0]) if len(hit) else None


@dataclass
class CurateResult:
    """What `curate` measured; `summary.json` in the output directory holds the same."""

    out: Path
    rule: str
    val_set: str | None
    n_docs: int
    n_dropped: int
    dropped_fraction: float
    dropped_token_fraction: float | None
    negative_fraction: float
    negative_fraction_of_seen: float | None
    documents_seen: int | None
    target: float
    smooth_window: int
    steps: dict[str, int | None]
    final_loss: dict[str, float]
    saving: dict[str, float | None]
    baseline_reused: bool
    held_out: bool = False
    run_dirs: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d


def _saving(steps: int | None, base: int | None) -> float | None:
    if steps is None or base is None or base == 0:
        return None
    return 1.0 - steps / base


def analyse(
    curves: dict[str, pd.Series],
    values: pd.DataFrame,
    dropped: pd.DataFrame,
    controls: dict[str, pd.DataFrame],
    rule: DropRule,
    val_set: str | None,
    out: Path,
    smooth_window: int,
    baseline_reused: bool,
    run_dirs: dict[str, str] | None = None,
    notes: list[str] | None = None,
    held_out: bool = False,
) -> CurateResult:
    """Turn three validation-loss curves and the drop lists into the measured figures and the output files.

    Separate from the training so that it is tested on its own and can be rerun on finished runs.
    """
    sm = {name: smooth(c, smooth_window) for name, c in curves.items()}
    target = float(sm["baseline"].iloc[-1])
    steps = {name: steps_to_target(c, target) for name, c in sm.items()}
    final = {name: float(c.iloc[-1]) for name, c in curves.items()}
    saving = {name: _saving(steps[name], steps["baseline"]) for name in curves}
    tokens = "n_tokens" in values.columns and values["n_tokens"].sum() > 0
    seen = values[values["n_seen"] > 0] if "n_seen" in values.columns else None
    result = CurateResult(
        out=out,
        rule=str(rule),
        val_set=val_set,
        n_docs=len(values),
        n_dropped=len(dropped),
        dropped_fraction=len(dropped) / max(len(values), 1),
        dropped_token_fraction=float(dropped["n_tokens"].sum() / values["n_tokens"].sum())
        if tokens
        else None,
        negative_fraction=float((values["value"] < 0).mean()) if len(values) else 0.0,
        negative_fraction_of_seen=(
            float((seen["value"] < 0).mean()) if seen is not None and len(seen) else None
        ),
        documents_seen=None if seen is None else len(seen),
        target=target,
        smooth_window=smooth_window,
        steps=steps,
        final_loss=final,
        saving=saving,
        baseline_reused=baseline_reused,
        held_out=held_out,
        run_dirs=run_dirs or {},
        notes=list(notes or []),
    )
    ctrl_steps = [steps[n] for n in controls]
    if steps["curated"] is not None and steps["baseline"] and all(s is not None for s in ctrl_steps):
        mean_ctrl = float(np.mean(ctrl_steps))
        spread = (
            ""
            if len(ctrl_steps) == 1
            else f" (range {min(ctrl_steps)}-{max(ctrl_steps)} over {len(ctrl_steps)} seeds)"
        )
        result.notes.append(
            f"curated vs random-drop control: {steps['curated']} vs {mean_ctrl:g} steps{spread}, i.e. "
            f"{(mean_ctrl - steps['curated']) / steps['baseline']:+.1%} of the baseline's steps in favour of curation"
        )
    elif steps["curated"] is not None and any(s is None for s in ctrl_steps):
        result.notes.append("the random-drop control never reached the target while the curated run did")
    _write_outputs(result, curves, sm, values, dropped, controls)
    return result


def _write_outputs(
    r: CurateResult,
    curves: dict[str, pd.Series],
    sm: dict[str, pd.Series],
    values: pd.DataFrame,
    dropped: pd.DataFrame,
    controls: dict[str, pd.DataFrame],
) -> None:
    out = r.out
    out.mkdir(parents=True, exist_ok=True)
    names = list(curves)
    wide = pd.DataFrame({name: curves[name] for name in names})
    wide.index.name = "step"
    wide = wide.join(pd.DataFrame({f"{n}_smoothed": sm[n] for n in names}))
    with atomic_path(out / "curves.csv") as tmp:
        wide.to_csv(tmp)
    table = pd.DataFrame(
        {
            "run": names,
            "documents_dropped": [
                len(controls[n]) if n in controls else (r.n_dropped if n == "curated" else 0) for n in names
            ],
            "steps_to_target": pd.array([r.steps.get(n) for n in names], dtype="Int64"),
            "saving_vs_baseline": [r.saving.get(n) for n in names],
            "final_val_loss": [r.final_loss.get(n) for n in names],
        }
    )
    with atomic_path(out / "steps_to_target.csv") as tmp:
        table.to_csv(tmp, index=False)
    for name, df in (
        ("dropped.csv", dropped),
        *((f"{n.replace('-', '_')}_dropped.csv", c) for n, c in controls.items()),
    ):
        with atomic_path(out / name) as tmp:
            df.to_csv(tmp, index=False)
    with atomic_path(out / "dropped_sources.csv") as tmp:
        source_breakdown(values, dropped).to_csv(tmp, index=False)
    _plot(r, curves, sm, out / "curves.png")
    with atomic_write(out / "summary.json") as fh:
        json.dump(r.to_json(), fh, indent=2)
    with atomic_write(out / "summary.md") as fh:
        fh.write(summary_markdown(r, source_breakdown(values, dropped), table))


def _plot(r: CurateResult, curves: dict[str, pd.Series], sm: dict[str, pd.Series], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook's) alone

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    colors = {"baseline": "tab:blue", "curated": "tab:green"}
    labels = {
        "baseline": "baseline (full corpus)",
        "curated": f"curated ({r.rule})",
        "random": "random-drop control",
    }
    for name in curves:
        colors.setdefault(name, "tab:grey")
        ax.plot(curves[name].index, curves[name].values, color=colors[name], alpha=0.3, lw=1)
        ax.plot(sm[name].index, sm[name].values, color=colors[name], lw=2, label=labels.get(name))
        if r.steps.get(name) is not None:
            ax.axvline(r.steps[name], color=colors[name], ls=":", lw=1)
    ax.axhline(r.target, color="black", ls="--", lw=0.8, label=f"target {r.target:.3f}")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss" + (f" ({r.val_set})" if r.val_set else " (mean over sets)"))
    ax.set_title(f"Curation: dropped {r.n_dropped} of {r.n_docs} documents ({r.dropped_fraction:.1%})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def fmt_steps(s: int | None) -> str:
    """Steps to the target, or 'not reached'."""
    return "not reached" if s is None else str(s)


def fmt_pct(x: float | None) -> str:
    """A signed percentage, or 'n/a'."""
    return "n/a" if x is None else f"{x:+.1%}"


def summary_markdown(r: CurateResult, sources: pd.DataFrame, table: pd.DataFrame) -> str:
    """The short human-readable summary; every figure in it is also in summary.json / the CSVs."""
    tok = "" if r.dropped_token_fraction is None else f" ({r.dropped_token_fraction:.1%} of tokens)"
    lines = [
        "# Curation by value",
        "",
        f"- Rule: `{r.rule}`, values against "
        + (f"validation set `{r.val_set}`" if r.val_set else "all validation sets (summed)")
        + ".",
        f"- Documents with a negative value: {r.negative_fraction:.1%} of {r.n_docs}"
        + (
            ""
            if r.documents_seen is None
            else f" ({r.negative_fraction_of_seen:.1%} of the {r.documents_seen} documents the run trained on; "
            "a document never in a batch has value 0)"
        )
        + ".",
        f"- Dropped: {r.n_dropped} documents = {r.dropped_fraction:.1%}{tok}.",
        f"- Target validation loss: {r.target:.4f} (baseline's final loss, trailing mean over "
        f"{r.smooth_window} evaluation(s)).",
        f"- Baseline: {'reused the valued run RUN itself' if r.baseline_reused else 'retrained'}; "
        "all runs use the same schedule and seed.",
        "",
        "| run | documents dropped | steps to target | saving vs baseline | final val loss |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in table.to_dict("records"):
        name = row["run"]
        lines.append(
            f"| {name} | {row['documents_dropped']} | {fmt_steps(r.steps[name])} | "
            f"{fmt_pct(r.saving[name])} | {r.final_loss[name]:.4f} |"
        )
    lines += [
        "",
        "Dropped documents by source:",
        "",
        "| source | documents | dropped | fraction of source | share of dropped |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in sources.itertuples(index=False):
        lines.append(
            f"| {row.source} | {row.documents} | {row.dropped} | {row.fraction_of_source_dropped:.1%} | "
            f"{row.share_of_dropped:.1%} |"
        )
    lines += ["", "## Reading this honestly", ""]
    lines += [f"- {n}" for n in r.notes]
    lines += [
        "- Only the gap between *curated* and the *random-drop* control speaks for curation; the gap to the "
        "baseline also contains the effect of removing any data at all.",
        "- One seed per run: differences of a few evaluation intervals are within run-to-run noise.",
        (
            "- Documents were ranked on some validation texts and loss was measured on the others (held out)."
            if r.held_out
            else "- The documents were chosen by their value against the same validation texts whose loss is measured "
            "here, so this is an in-sample result; `--holdout` is the stricter test."
        ),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Training (delegated to attribution.train)


def _load_config(run_dir: Path):
    """Rebuild the RUN's resolved `RunConfig` from its manifest, on a fixed number of steps.

    A run given in epochs is pinned to the steps it actually took: a smaller corpus would otherwise
    get fewer steps, and "the same schedule" would not hold.
    """
    from attribution.train import RunConfig

    manifest = Manifest.read(run_dir)
    if manifest.status != "complete":
        raise UserError(f"{run_dir}: the run is not complete (status {manifest.status!r})")
    config = RunConfig.of_run(manifest.config).resolved()
    total = manifest.training.total_steps or config.steps
    # the run's own copies of its validation sets: the original paths may be relative or gone
    copies = RunDir(run_dir).val_set_paths()
    val = {name: str(copies[name]) if name in copies else path for name, path in config.val.items()}
    return dataclasses.replace(config, steps=int(total), epochs=None, val=val), manifest


def _train(config, out: Path, exclude: list[str], eval_every: int, val: dict[str, str]) -> Path:
    """One plain retrain (no valuation: it is only the loss curve that counts) on the RUN's schedule and seed,
    minus `exclude` (on top of RUN's own `exclude_ids`). A finished retrain of the same configuration in `out` is reused, so rerunning `curate`
    with another `--smooth` costs nothing."""
    from attribution.train import train_and_value

    cfg = dataclasses.replace(
        # RUN's own exclusions (e.g. held-out validation documents) stay out of every retrain
        config,
        out=str(out),
        exclude_ids=tuple(sorted(set(map(str, config.exclude_ids)) | set(exclude))),
        eval_every=eval_every,
        val=val,
        value=False,
        resume=False,
        checkpoint_every=int(config.steps),
    ).resolved()
    retrain = RunDir(out)
    if retrain.manifest_path.is_file():
        if retrain.finished_with(cfg):
            click.echo(f"curate: reusing the finished retrain in {out}", err=True)
            return out
        raise UserError(f"{out} holds a different or unfinished run; choose another --out")
    return Path(train_and_value(cfg))


def split_validation(
    run_dir: Path, val_set: str, fraction: float, seed: int
) -> tuple[list[str], Path, list[str]]:
    """Split a validation set's texts into a *selection* part (ranks documents) and a *held-out* part
    (measures loss). Returns (selection ids, path of the held-out JSONL in the run, held-out ids)."""
    path = RunDir(run_dir).val_sets_dir / f"{val_set}.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: missing; --holdout needs the run's copy of validation set {val_set!r}")
    ids = [t.id for t in read_val_set(path)]
    n_hold = int(round(len(ids) * fraction))
    if n_hold < 1 or n_hold >= len(ids):
        raise UserError(f"--holdout {fraction:g} leaves an empty part of the {len(ids)} texts of {val_set!r}")
    perm = np.random.default_rng(seed).permutation(len(ids))
    hold = set(perm[:n_hold].tolist())
    return [ids[i] for i in range(len(ids)) if i not in hold], path, sorted(ids[i] for i in hold)


def example_document_values(run_dir: Path, val_set: str, val_ids: list[str]) -> pd.DataFrame:
    """Like `document_values`, but summed over the given validation texts only (from example_values.parquet)."""
    run = RunValues.read(run_dir)
    if not run.has_examples():
        raise UserError(
            f"{run.run.example_values_path}: missing; --holdout needs per-text values (a validation "
            "set of at most `per_example_max` texts)"
        )
    ev = run.examples(["value"])
    ev = ev[(ev["val_set"] == val_set) & ev["val_id"].isin(val_ids)]
    if ev.empty:
        raise UserError(f"{run.run.example_values_path}: no per-text values for validation set {val_set!r}")
    values = document_values(run_dir, val_set)
    per_doc = ev.groupby("doc_id")["value"].sum()
    values["value"] = values["doc_id"].map(per_doc).fillna(0.0).astype("float64")
    return values


def _write_heldout(src: Path, ids: list[str], dest: Path) -> Path:
    """The run's validation texts whose ids are in `ids`, as JSONL (each object as the run wrote it)."""
    keep = set(ids)
    with atomic_write(dest) as fh:
        for t in read_val_set(src):
            if t.id in keep:
                fh.write(json.dumps(t.raw, ensure_ascii=False) + "\n")
    return dest


def curate(
    run: str | Path,
    drop: str = "negative",
    out: str | Path = "curation",
    val_set: str | None = None,
    eval_every: int | None = None,
    smooth_window: int = 3,
    control_seed: int = 0,
    reuse_baseline: bool = False,
    holdout: float = 0.0,
    n_controls: int = 1,
) -> CurateResult:
    """Drop documents by value, retrain baseline / curated / random-drop, and measure steps to the target.

    `holdout > 0` ranks documents by their value against part of `val_set`'s texts and measures loss
    on the rest, so selection and measurement do not share texts (needs per-text values).
    """
    run_dir, out = Path(run), Path(out)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    rule = parse_drop(drop)
    if n_controls < 1:
        raise UserError(
            "--controls must be at least 1: without a random-drop control no curation claim is honest"
        )
    config, _ = _load_config(run_dir)
    measure_set, val = val_set, dict(config.val)
    notes: list[str] = []
    if holdout:
        if reuse_baseline:
            raise UserError(
                "--holdout measures loss on a new validation split; it cannot reuse RUN as the baseline"
            )
        if val_set is None:
            if len(config.val) != 1:
                raise UserError("--holdout needs --val-set NAME when the run has several validation sets")
            val_set = next(iter(config.val))
        select_ids, src, hold_ids = split_validation(run_dir, val_set, holdout, control_seed)
        values = example_document_values(run_dir, val_set, select_ids)
        out.mkdir(parents=True, exist_ok=True)
        measure_set = f"{val_set}-heldout"
        val = {measure_set: str(_write_heldout(src, hold_ids, out / f"{measure_set}.jsonl"))}
        notes.append(
            f"held-out: documents ranked on {len(select_ids)} texts of `{val_set}`, loss measured on the "
            f"other {len(hold_ids)} (`{measure_set}.jsonl`)"
        )
    else:
        values = document_values(run_dir, val_set)
    dropped = select_drop(values, rule)
    if dropped.empty:
        raise UserError(f"rule {rule} drops no document in {run_dir}; nothing to compare")
    if len(dropped) >= len(values):
        raise UserError(f"rule {rule} drops every document; nothing left to train on")
    controls = {
        control_name(k): random_drop(values, len(dropped), seed=control_seed + k) for k in range(n_controls)
    }
    every = eval_every or max(1, int(config.steps) // 30)
    run_dirs: dict[str, str] = {}
    curves: dict[str, pd.Series] = {}
    plan = [("baseline", []), ("curated", list(dropped["doc_id"]))]
    plan += [(name, list(c["doc_id"])) for name, c in controls.items()]
    for name, exclude in plan:
        if name == "baseline" and reuse_baseline:
            path = run_dir
        else:
            click.echo(
                f"curate: training {name} ({len(exclude)} documents left out, {config.steps} steps)", err=True
            )
            path = _train(config, out / "runs" / name, exclude, every, val)
        run_dirs[name] = str(path)
        curves[name] = val_loss_curve(pd.read_csv(path / "train_log.csv"), measure_set)
    result = analyse(
        curves,
        values,
        dropped,
        controls,
        rule,
        measure_set,
        out,
        smooth_window,
        baseline_reused=reuse_baseline,
        run_dirs=run_dirs,
        notes=notes,
        held_out=bool(holdout),
    )
    return result
