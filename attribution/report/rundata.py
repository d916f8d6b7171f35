"""Read what `attribution run` wrote, for the report: one `Run` per run directory.

The report only reads, through `attribution.values`; it never trusts the text it finds (documents and names are untrusted and
are escaped by the renderers). Missing optional files reduce what the report can say, and the
report says so; missing required files are a UserError.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from attribution.errors import UserError
from attribution.values import Manifest, RunDir, RunValues, ValText
from attribution.values.rundir import DOC_VALUES, DOCS, REQUIRED

DOC_COLUMNS = ("doc_id", "source", "owner", "n_tokens")


@dataclass
class Run:
    """One run directory, loaded lazily except for the small tables every report needs."""

    path: Path
    manifest: Manifest
    docs: pd.DataFrame  # doc_id, source, owner, license, n_tokens (no text)
    doc_values: pd.DataFrame
    _texts: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def dir(self) -> RunDir:
        return RunDir(self.path)

    @property
    def name(self) -> str:
        return str(self.manifest.extra.get("name") or self.path.name)

    @cached_property
    def values(self) -> RunValues:
        """The run's values with read-time attribution views (`attribution.values.RunValues`)."""
        return RunValues.read(
            self.dir, docs=self.docs, doc_values=self.doc_values, default_view=self.manifest.default_view
        )

    def optional(self, filename: str, columns: Sequence[str] | None = None) -> pd.DataFrame | None:
        return self.dir.table(filename, columns)

    def texts(self, doc_ids: Iterable[str]) -> dict[str, str]:
        """Texts of the given documents only (reading all texts of a 1M-document run is wasteful)."""
        want = sorted(set(doc_ids) - set(self._texts))
        if want:
            p = self.dir.docs_path
            if "text" in pq.read_schema(p).names:
                t = pq.read_table(p, columns=["doc_id", "text"], filters=[("doc_id", "in", want)]).to_pandas()
                self._texts.update(zip(t.doc_id.astype(str), t.text.fillna("").astype(str), strict=True))
            for d in want:
                self._texts.setdefault(d, "")
        return {d: self._texts.get(d, "") for d in doc_ids}

    def val_sets(self) -> dict[str, list[ValText]]:
        """The run's copies of its validation sets (`val_sets/NAME.jsonl`)."""
        return self.dir.val_sets()

    def train_log(self) -> pd.DataFrame | None:
        return self.dir.train_log()


def load_run(path: str | Path) -> Run:
    """Load the small tables of one run directory; UserError if it is not a run directory."""
    rd = RunDir(path)
    rd.require(REQUIRED)
    manifest = rd.manifest()
    have = rd.columns(DOCS)
    cols = [c for c in ("doc_id", "source", "owner", "license", "n_tokens", "n_seqs") if c in have]
    docs = rd.table(DOCS, cols, needs=DOC_COLUMNS)
    dv_have = rd.columns(DOC_VALUES)
    dv_cols = ["doc_id", "val_set", "value"] + [c for c in ("n_seen",) if c in dv_have]
    doc_values = rd.table(DOC_VALUES, dv_cols, needs=("doc_id", "val_set", "value"))
    assert docs is not None and doc_values is not None
    docs["source"] = docs["source"].fillna("unknown").astype(str)
    docs["owner"] = docs["owner"].fillna("unknown").astype(str)
    return Run(path=rd.path, manifest=manifest, docs=docs, doc_values=doc_values)


def choose_val_sets(runs: Sequence[Run], requested: Sequence[str] | None) -> list[str]:
    """The validation sets the royalty is computed on: the requested ones, or all of them."""
    available = sorted(set().union(*(set(r.doc_values.val_set.unique()) for r in runs)))
    if not requested:
        return available
    unknown = [v for v in requested if v not in available]
    if unknown:
        raise UserError(
            f"unknown validation set(s) {', '.join(unknown)}; this run has: {', '.join(available)}"
        )
    return sorted(dict.fromkeys(requested))
