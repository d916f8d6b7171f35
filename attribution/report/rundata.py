"""Read what `attribution run` wrote, for the report: one `Run` per run directory.

The report only reads; it never trusts the text it finds (documents and names are untrusted and
are escaped by the renderers). Missing optional files reduce what the report can say, and the
report says so; missing required files are a UserError.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from attribution.errors import BadInputError, UserError

REQUIRED = ("manifest.json", "docs.parquet", "doc_values.parquet")
DOC_COLUMNS = ("doc_id", "source", "owner", "n_tokens")


def fact(mapping: Any, *names: str, default: Any = None) -> Any:
    """First value found under any of `names`, searching nested dicts breadth-first.

    Why: the manifest layout belongs to the training stage and may nest its configuration; the
    report should find `steps` whether it sits at the top or under `config`.
    """
    for scalar_only in (True, False):  # prefer a scalar; a dict-valued match (e.g. "model": {...}) is the fallback
        queue = [mapping]
        while queue:
            cur = queue.pop(0)
            if not isinstance(cur, dict):
                continue
            for name in names:
                value = cur.get(name)
                if value is not None and not (scalar_only and isinstance(value, dict)):
                    return value
            queue.extend(v for v in cur.values() if isinstance(v, dict))
    return default


@dataclass
class Run:
    """One run directory, loaded lazily except for the small tables every report needs."""

    path: Path
    manifest: dict
    docs: pd.DataFrame  # doc_id, source, owner, license, n_tokens (no text)
    doc_values: pd.DataFrame
    _texts: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or self.path.name)

    def optional(self, filename: str, columns: Sequence[str] | None = None) -> pd.DataFrame | None:
        p = self.path / filename
        if not p.exists():
            return None
        try:
            return pd.read_parquet(p, columns=list(columns) if columns else None)
        except Exception as exc:  # pyarrow raises several types for a damaged or foreign file
            raise BadInputError(p, None, f"cannot read Parquet file: {exc}") from exc

    def texts(self, doc_ids: Iterable[str]) -> dict[str, str]:
        """Texts of the given documents only (reading all texts of a 1M-document run is wasteful)."""
        want = sorted(set(doc_ids) - set(self._texts))
        if want:
            p = self.path / "docs.parquet"
            if "text" in pq.read_schema(p).names:
                t = pq.read_table(p, columns=["doc_id", "text"], filters=[("doc_id", "in", want)]).to_pandas()
                self._texts.update(zip(t.doc_id.astype(str), t.text.fillna("").astype(str), strict=True))
            for d in want:
                self._texts.setdefault(d, "")
        return {d: self._texts.get(d, "") for d in doc_ids}

    def val_sets(self) -> dict[str, list[dict]]:
        """`val_sets/NAME.jsonl` as lists of {"id", "text", "meta"}."""
        out: dict[str, list[dict]] = {}
        folder = self.path / "val_sets"
        if not folder.is_dir():
            return out
        for f in sorted(folder.glob("*.jsonl")):
            items = []
            with open(f, encoding="utf-8") as fh:
                for i, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise BadInputError(f, i, f"not JSON: {exc.msg}") from None
                    items.append({"id": str(obj.get("id", f"{f.stem}-{i}")), "text": str(obj.get("text", "")),
                                  "meta": obj.get("meta") or {}})
            out[f.stem] = items
        return out

    def train_log(self) -> pd.DataFrame | None:
        p = self.path / "train_log.csv"
        return pd.read_csv(p) if p.exists() else None


def load_run(path: str | Path) -> Run:
    """Load the small tables of one run directory; UserError if it is not a run directory."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (expected a run directory written by `attribution run`)")
    missing = [f for f in REQUIRED if not (path / f).exists()]
    if missing:
        raise UserError(f"{path}: not a finished run directory, missing {', '.join(missing)}")
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadInputError(path / "manifest.json", exc.lineno, exc.msg) from None
    schema = pq.read_schema(path / "docs.parquet").names
    lacking = [c for c in DOC_COLUMNS if c not in schema]
    if lacking:
        raise BadInputError(path / "docs.parquet", None, f"missing columns {', '.join(lacking)}")
    cols = [c for c in ("doc_id", "source", "owner", "license", "n_tokens", "n_seqs") if c in schema]
    docs = pd.read_parquet(path / "docs.parquet", columns=cols)
    docs["doc_id"] = docs["doc_id"].astype(str)
    docs["source"] = docs["source"].fillna("unknown").astype(str)
    docs["owner"] = docs["owner"].fillna("unknown").astype(str)
    dv_schema = pq.read_schema(path / "doc_values.parquet").names
    need = ["doc_id", "val_set", "value"]
    lacking = [c for c in need if c not in dv_schema]
    if lacking:
        raise BadInputError(path / "doc_values.parquet", None, f"missing columns {', '.join(lacking)}")
    dv_cols = need + [c for c in ("n_seen",) if c in dv_schema]
    doc_values = pd.read_parquet(path / "doc_values.parquet", columns=dv_cols)
    doc_values["doc_id"] = doc_values["doc_id"].astype(str)
    doc_values["val_set"] = doc_values["val_set"].astype(str)
    return Run(path=path, manifest=manifest, docs=docs, doc_values=doc_values)


def choose_val_sets(runs: Sequence[Run], requested: Sequence[str] | None) -> list[str]:
    """The validation sets the royalty is computed on: the requested ones, or all of them."""
    available = sorted(set().union(*(set(r.doc_values.val_set.unique()) for r in runs)))
    if not requested:
        return available
    unknown = [v for v in requested if v not in available]
    if unknown:
        raise UserError(f"unknown validation set(s) {', '.join(unknown)}; this run has: {', '.join(available)}")
    return sorted(dict.fromkeys(requested))
