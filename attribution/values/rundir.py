"""The run directory written by `attribution run`: its file names and the one reader of each file.

Why: the report, `attribution compare`, curation, the copyright experiment, the demo and the notebook
API all read the same directory. Each file is located and parsed here once (the validation-set JSONL
copies included), so a change of layout is a change of this module.

| file | contents |
| --- | --- |
| `manifest.json` | `attribution.values.manifest.Manifest` |
| `docs.parquet` | `doc_id, source, owner, license, n_tokens, n_seqs` (+ `text` for snippets) |
| `doc_values.parquet` | `doc_id, source, owner, val_set, value, value_normalized, n_seen, first_step, last_step` |
| `example_values.parquet` | `doc_id, val_set, val_id, value, value_normalized, value_cosine` (raw accumulators) |
| `checkpoint_values.parquet` | `doc_id, val_set, val_id, checkpoint_cosine` (after training, at the kept checkpoints) |
| `stage_values.parquet` | `window_start, window_end, source, val_set, value, value_normalized` |
| `step_values.parquet` | `step, doc_id, val_set, value, value_normalized` |
| `val_sets/NAME.jsonl` | the validation texts used, `{"id", "text", "meta"}` a line |
| `train_log.csv` | `step, lr, train_loss, val_loss[<set>]..., tokens_per_s` |
| `checkpoints/` | `model.safetensors`, `optimizer.safetensors`, `state.json` |
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from attribution.errors import BadInputError, UserError
from attribution.values.manifest import FILENAME as MANIFEST
from attribution.values.manifest import Manifest

DOCS = "docs.parquet"
DOC_VALUES = "doc_values.parquet"
EXAMPLE_VALUES = "example_values.parquet"
CHECKPOINT_VALUES = "checkpoint_values.parquet"  # attribution.workflows.checkpoint_similarity
STEP_VALUES = "step_values.parquet"
STAGE_VALUES = "stage_values.parquet"
TRAIN_LOG = "train_log.csv"
VAL_SETS = "val_sets"
CHECKPOINTS = "checkpoints"
REQUIRED = (MANIFEST, DOCS, DOC_VALUES)


@dataclass(frozen=True)
class ValText:
    """One validation text of a run: its id, text, `meta` fields and the JSON object as it was written."""

    id: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def read_val_set(path: Path) -> list[ValText]:
    """A validation set's JSONL copy; BadInputError (file, line) for a line that is not a JSON object with text."""
    items = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInputError(path, lineno, f"not JSON: {exc.msg}") from None
            if not isinstance(obj, dict) or "text" not in obj:
                raise BadInputError(path, lineno, "expected an object with a 'text' field")
            meta = obj.get("meta")
            items.append(
                ValText(
                    str(obj.get("id", f"{path.stem}-{lineno}")),
                    str(obj["text"]),
                    dict(meta) if isinstance(meta, dict) else {},
                    obj,
                )
            )
    return items


class RunDir:
    """Paths of one run directory and readers of its files (it writes only what `write_*` says)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def docs_path(self) -> Path:
        return self.path / DOCS

    @property
    def doc_values_path(self) -> Path:
        return self.path / DOC_VALUES

    @property
    def example_values_path(self) -> Path:
        return self.path / EXAMPLE_VALUES

    @property
    def step_values_path(self) -> Path:
        return self.path / STEP_VALUES

    @property
    def stage_values_path(self) -> Path:
        return self.path / STAGE_VALUES

    @property
    def train_log_path(self) -> Path:
        return self.path / TRAIN_LOG

    @property
    def val_sets_dir(self) -> Path:
        return self.path / VAL_SETS

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    # ---- checks -------------------------------------------------------------------------------

    def require(self, names: Sequence[str] = REQUIRED) -> None:
        """UserError unless this is a directory holding every file in `names`."""
        if not self.path.is_dir():
            raise UserError(
                f"{self.path}: not a directory (expected a run directory written by `attribution run`)"
            )
        missing = [f for f in names if not (self.path / f).exists()]
        if missing:
            raise UserError(f"{self.path}: not a finished run directory, missing {', '.join(missing)}")

    def finished_with(self, config: Any, needs: Sequence[str] = ()) -> bool:
        """Whether this directory holds a complete run of exactly `config` (and the files in `needs`)."""
        if not self.manifest_path.is_file() or not all((self.path / f).is_file() for f in needs):
            return False
        return self.manifest().is_complete(config)

    # ---- readers ------------------------------------------------------------------------------

    def manifest(self, required: bool = True) -> Manifest:
        """The typed manifest; with `required=False` a missing one reads as an empty (version 1) manifest."""
        if not required and not self.manifest_path.is_file():
            return Manifest.from_dict({})
        return Manifest.read(self.path)

    def columns(self, name: str) -> list[str]:
        """Column names of one Parquet file of the run (BadInputError if it is damaged)."""
        path = self.path / name
        try:
            return list(pq.read_schema(path).names)
        except Exception as exc:  # pyarrow raises several types for a damaged or foreign file
            raise BadInputError(path, None, f"cannot read Parquet file: {exc}") from exc

    def table(
        self,
        name: str,
        columns: Sequence[str] | None = None,
        *,
        required: bool = False,
        needs: Sequence[str] = (),
    ) -> pd.DataFrame | None:
        """One Parquet file as a DataFrame (only `columns` when given); None when it is absent and optional.

        `needs`: columns that must be present (BadInputError naming them otherwise)."""
        path = self.path / name
        if not path.is_file():
            if required:
                raise UserError(f"{path}: missing; is this a run directory written by `attribution run`?")
            return None
        if needs:
            lacking = [c for c in needs if c not in self.columns(name)]
            if lacking:
                raise BadInputError(path, None, f"missing columns {', '.join(lacking)}")
        try:
            frame = pd.read_parquet(path, columns=list(columns) if columns is not None else None)
        except Exception as exc:  # pyarrow raises several types for a damaged or foreign file
            raise BadInputError(path, None, f"cannot read Parquet file: {exc}") from exc
        for col in ("doc_id", "val_set", "val_id"):
            if col in frame.columns:
                frame[col] = frame[col].astype(str)
        return frame

    def train_log(self) -> pd.DataFrame | None:
        return pd.read_csv(self.train_log_path) if self.train_log_path.is_file() else None

    def val_set_paths(self) -> dict[str, Path]:
        """`{name: path}` of the run's validation-set copies, by name."""
        folder = self.val_sets_dir
        return {p.stem: p for p in sorted(folder.glob("*.jsonl"))} if folder.is_dir() else {}

    def val_sets(self) -> dict[str, list[ValText]]:
        """Every validation set the run was valued against, from its own copies in `val_sets/`."""
        return {name: read_val_set(path) for name, path in self.val_set_paths().items()}
