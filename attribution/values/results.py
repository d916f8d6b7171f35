"""A run's values as one result object (in the manner of pyDVL's `ValuationResult`), views computed on read.

Why views are computed here and not stored: the raw accumulators (`value`, `value_normalized`,
`value_cosine`) are what training measured; a view (`attribution.values.views`) is analysis of them,
a pure function of those columns and the documents' token counts. Computing it when the run is read
keeps the training stage free of analysis, lets a new view apply to old runs, and gives every reader
(report, compare, experiment, curation, demo, notebook) the same numbers from the same code.

- `RunValues.to_dataframe()`: one row per document, its raw additive `value` (royalties use it);
- `RunValues.by("source" | "owner")`: sums of that raw value per group;
- `RunValues.view(name)`: per-example attribution (`doc_id, val_set, val_id, value, attribution`)
  under one view, by default the run's (`Manifest.default_view`);
- `RunValues.with_views()`: the raw per-example rows with every view the run's columns allow, as
  `view_<name>` columns, and `attribution` = the default view.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from attribution.errors import UserError
from attribution.values import views as views_mod
from attribution.values.manifest import ATTRIBUTION_COLUMN
from attribution.values.rundir import CHECKPOINT_VALUES, DOC_VALUES, DOCS, EXAMPLE_VALUES, RunDir

KEYS = tuple(views_mod.KEYS)
RAW_COLUMNS = ("value", "value_normalized", "value_cosine")  # what the value store writes per example
# computed after training at the kept checkpoints (attribution.workflows.checkpoint_similarity), own table
CHECKPOINT_COLUMN = "checkpoint_cosine"
DOC_META = ("doc_id", "source", "owner", "license", "n_tokens")
GROUPS = ("source", "owner")


@dataclass
class RunValues:
    """The values of one run directory. Tables are read on first use and only the columns asked for."""

    run: RunDir
    default_view: str
    docs: pd.DataFrame  # doc_id, source, owner (+ license, n_tokens when the run has them)
    _doc_values: pd.DataFrame | None = field(default=None, repr=False)
    _columns: dict[str, pd.Series] = field(default_factory=dict, repr=False)

    @classmethod
    def read(
        cls,
        run: str | Path | RunDir,
        *,
        docs: pd.DataFrame | None = None,
        doc_values: pd.DataFrame | None = None,
        default_view: str | None = None,
    ) -> RunValues:
        """Open a run's values. `docs`/`doc_values`: tables the caller already read (same files)."""
        rd = run if isinstance(run, RunDir) else RunDir(run)
        if default_view is None:
            default_view = rd.manifest(required=False).default_view
        if docs is None:
            have = rd.columns(DOCS) if rd.docs_path.is_file() else []
            docs = rd.table(DOCS, [c for c in DOC_META if c in have], required=True, needs=("doc_id",))
        return cls(rd, default_view, docs, doc_values)

    # ---- documents: raw additive values --------------------------------------------------------

    @property
    def doc_values(self) -> pd.DataFrame:
        """`doc_values.parquet`: doc_id, val_set, value (+ n_seen when recorded)."""
        if self._doc_values is None:
            have = self.run.columns(DOC_VALUES) if self.run.doc_values_path.is_file() else []
            cols = ["doc_id", "val_set", "value"] + [c for c in ("n_seen",) if c in have]
            self._doc_values = self.run.table(
                DOC_VALUES, cols, required=True, needs=("doc_id", "val_set", "value")
            )
        return self._doc_values

    def val_set_names(self) -> list[str]:
        return sorted(self.doc_values["val_set"].unique())

    def to_dataframe(self, val_set: str | None = None) -> pd.DataFrame:
        """One row per document (corpus order): its metadata, `value` for one validation set or summed
        over all of them (`val_set=None`; Shapley values add up), and `n_seen` when recorded.

        A document with no row in `doc_values` (never in a batch) gets value 0: nothing is known against it."""
        dv = self.doc_values
        if val_set is not None:
            known = self.val_set_names()
            if val_set not in known:
                raise UserError(f"unknown validation set {val_set!r}; this run has: {', '.join(known)}")
            dv = dv[dv["val_set"] == val_set]
        grouped = dv.groupby("doc_id")
        meta = [c for c in DOC_META if c in self.docs.columns]
        out = self.docs[meta].merge(
            grouped["value"].sum().rename("value"), left_on="doc_id", right_index=True, how="left"
        )
        out["value"] = out["value"].fillna(0.0).astype("float64")
        if "n_seen" in dv.columns:
            out = out.merge(
                grouped["n_seen"].max().rename("n_seen"), left_on="doc_id", right_index=True, how="left"
            )
            out["n_seen"] = out["n_seen"].fillna(0).astype("int64")
        return out.reset_index(drop=True)

    def by(self, group: str, val_set: str | None = None) -> pd.Series:
        """Sum of the documents' raw `value` per source or owner (the additive accounting view)."""
        if group not in GROUPS:
            raise UserError(f"values are summed by 'source' or 'owner', not {group!r}")
        totals = self.to_dataframe(val_set)
        return totals.groupby(group)["value"].sum()

    # ---- per-example values and views ----------------------------------------------------------

    def _stored(self) -> list[str]:
        if not self.run.example_values_path.is_file():
            return []
        extra = [CHECKPOINT_COLUMN] if (self.run.path / CHECKPOINT_VALUES).is_file() else []
        return self.run.columns(EXAMPLE_VALUES) + extra

    def _checkpoint_column(self, keys: pd.DataFrame) -> pd.Series:
        """`checkpoint_cosine` aligned with the example rows' keys (NaN where the table has no row)."""
        cols = [*KEYS, CHECKPOINT_COLUMN]
        table = self.run.table(CHECKPOINT_VALUES, cols, required=True, needs=cols)
        assert table is not None
        lookup = table.astype({k: str for k in KEYS}).set_index(list(KEYS))[CHECKPOINT_COLUMN]
        index = pd.MultiIndex.from_frame(keys[list(KEYS)].astype(str))
        return pd.Series(lookup.reindex(index).to_numpy(dtype=np.float64), index=keys.index)

    def has_examples(self) -> bool:
        return all(c in self._stored() for c in (*KEYS, "value"))

    def examples(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Raw per-example rows: the keys and the accumulators asked for (default: all the run has).

        Derived columns that runs before manifest schema 2 stored (`view_*`, `attribution`) are never
        read: views are recomputed from the accumulators, with the same code and the same numbers. An
        all-null `value_cosine` (a run without gradient norms) counts as absent."""
        if not self.has_examples():
            raise UserError(
                f"{self.run.example_values_path}: missing or without per-example values; "
                "per-text values were not recorded"
            )
        stored = self._stored()
        asked = dict.fromkeys(columns if columns is not None else (*RAW_COLUMNS, CHECKPOINT_COLUMN))
        want = [c for c in asked if c in stored and c not in KEYS]
        need = [c for c in (*KEYS, *want) if c not in self._columns and c != CHECKPOINT_COLUMN]
        if need:
            frame = self.run.table(EXAMPLE_VALUES, need)
            assert frame is not None
            self._columns.update({c: frame[c] for c in need})
        if CHECKPOINT_COLUMN in want and CHECKPOINT_COLUMN not in self._columns:
            keys = pd.DataFrame({c: self._columns[c] for c in KEYS})
            self._columns[CHECKPOINT_COLUMN] = self._checkpoint_column(keys)
        out = pd.DataFrame({c: self._columns[c] for c in (*KEYS, *want)})
        if "value_cosine" in out.columns and out["value_cosine"].isna().all() and len(out):
            out = out.drop(columns="value_cosine")
        return out

    def _view_docs(self) -> pd.DataFrame:
        return self.docs[[c for c in ("doc_id", "n_tokens") if c in self.docs.columns]]

    def available_views(self) -> list[str]:
        """Views this run's per-example columns (and the documents' `n_tokens`) allow."""
        return views_mod.available(self.examples(), self._view_docs())

    def with_views(self, names: Sequence[str] | None = None) -> pd.DataFrame:
        """Raw per-example rows plus `view_<name>` per view (all available by default) and `attribution`."""
        names = self.available_views() if names is None else list(names)
        return views_mod.compute(self.examples(), self._view_docs(), names, default=self.default_view)

    def view(self, name: str | None = None) -> pd.DataFrame:
        """Per-example attribution under one view (default: the run's): `doc_id, val_set, val_id, value,
        attribution`, and the columns the view reads (`checkpoint_cosine`, ...), whose standout z labels
        pairs (`compare`). Falls back to the in-run default view, then to the raw value, when the run
        lacks what the default view needs."""
        if name is None:
            have = self.available_views()
            name = next((v for v in (self.default_view, views_mod.IN_RUN_VIEW) if v in have), "value")
        elif name not in views_mod.VIEWS:
            raise UserError(f"unknown view {name!r}; known: {', '.join(views_mod.VIEWS)}")
        needs = [c for c in views_mod.VIEWS[name].needs if c != "n_tokens"]
        ev = self.examples(["value", *needs])
        if name == "value":
            score = ev["value"].to_numpy(dtype=np.float64)
        else:
            lacking = [
                c for c in views_mod.VIEWS[name].needs if c not in ev.columns and c not in self.docs.columns
            ]
            if lacking:
                raise UserError(
                    f"{self.run.path}: view {name!r} needs {', '.join(lacking)}, which this run lacks"
                )
            score = views_mod.VIEWS[name].fn(ev, self._view_docs()).to_numpy()
        out = ev[[*KEYS, "value", *(c for c in needs if c != "value" and c in ev.columns)]].copy()
        out[ATTRIBUTION_COLUMN] = score
        out.attrs["view"] = name
        return out
