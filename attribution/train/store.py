"""The value store: turns each step's per-sequence values into per-document totals on disk.

Why this shape: a run can last 100k steps, so nothing here may grow with the number of steps.
Totals live in float64 arrays sized by the corpus (`[n_docs, n_sets]`, and `[n_docs, n_examples]`
per validation set with per-example values), which the checkpoint saves and restores exactly.
The per-step rows (one per document in the batch and validation set) are buffered only until the
next checkpoint and then written as one Parquet part file under `<out>/.step_parts/`; a part whose
last step is beyond the checkpoint a run resumes from is deleted, so after a crash no step is lost
or counted twice. At the end, the parts are streamed into `step_values.parquet` and summarised into
`stage_values.parquet`.

Definitions (also recorded in the manifest):

- `value`: sum over the steps in which the document was trained, and over its sequences in that
  step, of the engine's per-sequence value. Positive = lowered validation loss.
- `value_normalized`: the same sum after dividing every step's values by that step's validation-loss
  reduction. The reduction used is the engine's own estimate for the whole (global) batch,
  `R_t = sum_j phi_t(j)` (Shapley values add up to the utility of the full batch). To keep steps
  whose values cancel out from blowing up, the divisor is `max(|R_t|, 0.1 * sum_j |phi_t(j)|)`;
  the sign of each value is kept. So each step hands out about one unit of credit, and early steps
  (large gradients) do not dominate the total.
- per-example values (`example_values.parquet`) carry, next to `value`: `value_normalized` (each
  step's values for one validation text divided by that text's own loss reduction, estimated the
  same way from its column, `max(|sum_j phi_t(j, x)|, 0.1 * sum_j |phi_t(j, x)|)`), `value_cosine`
  (sum over steps of each sequence's value / (||g_seq|| * ||g_val_text||), where g_val_text is the
  validation text's gradient, the sum of its sequences': the cosine with the whole text, as the
  checkpoint view's; norms from the engine; null when the run computed no norms, see
  `RunConfig.in_run_cosine`). These are raw accumulators only: the attribution views
  (`attribution.values.views`) are analysis and are computed when the run is read
  (`attribution.values.RunValues`); the manifest names the default one. `value` stays the raw
  additive value: royalties use it.
- `n_seen`: number of training sequences of the document processed (counting repeats over epochs).
- `first_step`, `last_step`: 1-based optimizer steps in which the document was first/last trained
  (null if never trained).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from attribution.io import atomic_path
from attribution.values.manifest import ValuesInfo
from attribution.values.views import DEFAULT_VIEW, VIEWS, column_of

NORMALIZATION_RULE = "phi_t / max(|sum_j phi_t(j)|, 0.1 * sum_j |phi_t(j)|), per step and validation set"
CANCEL_FLOOR = 0.1

STEP_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("doc_id", pa.string()),
        ("val_set", pa.string()),
        ("value", pa.float64()),
        ("value_normalized", pa.float64()),
    ]
)


def normalizer(values: np.ndarray) -> float:
    """The divisor for one step's values of one validation set (see the module docstring)."""
    total = abs(float(np.sum(values)))
    gross = float(np.sum(np.abs(values)))
    return max(total, CANCEL_FLOOR * gross)


class ValueStore:
    """Per-document accumulators plus the streamed per-step rows of one run directory."""

    def __init__(
        self,
        out: str | Path,
        docs: pd.DataFrame,
        seq_doc: np.ndarray,
        set_names: Sequence[str],
        example_ids: Mapping[str, Sequence[str]] | None = None,
        stage_window: int = 100,
    ):
        self.out = Path(out)
        self.parts_dir = self.out / ".step_parts"
        self.docs = docs.reset_index(drop=True)
        self.doc_ids = self.docs["doc_id"].astype(str).to_numpy()
        self.seq_doc = np.asarray(seq_doc, dtype=np.int64)
        self.set_names = list(set_names)
        self.example_ids = {k: [str(x) for x in v] for k, v in (example_ids or {}).items()}
        self.stage_window = int(stage_window)
        # the view the manifest names as the default; the loop sets the in-run one when no checkpoint
        # cosines are computed (no replay chain, --no-checkpoint-view)
        self.default_view = DEFAULT_VIEW
        n_docs, n_sets = len(self.docs), len(self.set_names)
        self.value = np.zeros((n_docs, n_sets), dtype=np.float64)
        self.value_norm = np.zeros((n_docs, n_sets), dtype=np.float64)
        self.n_seen = np.zeros(n_docs, dtype=np.int64)
        self.first_step = np.full(n_docs, -1, dtype=np.int64)
        self.last_step = np.full(n_docs, -1, dtype=np.int64)
        self.example = {
            name: np.zeros((n_docs, len(ids)), dtype=np.float64) for name, ids in self.example_ids.items()
        }
        self.example_norm = {k: np.zeros_like(v) for k, v in self.example.items()}
        self.example_cos = {k: np.zeros_like(v) for k, v in self.example.items()}
        self.has_cos = np.zeros(1, dtype=np.int64)  # 1 once any step brought cosine values
        self._pending: list[pa.RecordBatch] = []

    # ---- accumulation -------------------------------------------------------------------------

    def add(
        self,
        step: int,
        seq_idx: np.ndarray,
        per_set: Mapping[str, np.ndarray],
        per_example: Mapping[str, np.ndarray] | None = None,
        per_example_cos: Mapping[str, np.ndarray] | None = None,
        keep: np.ndarray | None = None,
    ) -> None:
        """Add one step's values. `seq_idx`: global sequence indices of the batch, in the order of
        the value arrays (`per_set[name]`: float64 `[batch]`; `per_example[name]`: `[batch, n_ex]`;
        `per_example_cos[name]`: the same values divided by the gradient norms, `[batch, n_ex]`).

        `keep` (bool `[batch]`): store only these rows (a targeted claim replay). The normalizers are
        still those of the whole batch, so the kept documents get exactly the values a full store would."""
        divisors = {name: normalizer(np.asarray(per_set[name], dtype=np.float64)) for name in self.set_names}
        ex_div = {
            name: np.maximum(np.abs(np.sum(m, 0)), CANCEL_FLOOR * np.abs(m).sum(0))
            for name, m in ((k, np.asarray(v, dtype=np.float64)) for k, v in (per_example or {}).items())
        }
        if keep is not None:
            seq_idx = np.asarray(seq_idx)[keep]
            per_set = {k: np.asarray(v)[keep] for k, v in per_set.items()}
            per_example = {k: np.asarray(v)[keep] for k, v in (per_example or {}).items()}
            per_example_cos = {k: np.asarray(v)[keep] for k, v in (per_example_cos or {}).items()}
        rows = self.seq_doc[np.asarray(seq_idx, dtype=np.int64)]
        uniq, inv = np.unique(rows, return_inverse=True)
        self.n_seen += np.bincount(rows, minlength=len(self.n_seen))
        self.first_step[uniq] = np.where(self.first_step[uniq] < 0, step, self.first_step[uniq])
        self.last_step[uniq] = step
        step_col, doc_col, set_col, val_col, norm_col = [], [], [], [], []
        for s, name in enumerate(self.set_names):
            v = np.asarray(per_set[name], dtype=np.float64)
            if v.shape != rows.shape:
                raise ValueError(f"values for {name!r} have shape {v.shape}, batch is {rows.shape}")
            doc_sum = np.bincount(inv, weights=v, minlength=len(uniq))
            div = divisors[name]
            doc_norm = doc_sum / div if div > 0 else np.zeros_like(doc_sum)
            self.value[uniq, s] += doc_sum
            self.value_norm[uniq, s] += doc_norm
            step_col.append(np.full(len(uniq), step, dtype=np.int64))
            doc_col.append(self.doc_ids[uniq])
            set_col.append(np.full(len(uniq), name, dtype=object))
            val_col.append(doc_sum)
            norm_col.append(doc_norm)
        for name, m in (per_example or {}).items():
            if name not in self.example:
                continue
            m = np.asarray(m, dtype=np.float64)
            acc = np.zeros((len(uniq), m.shape[1]), dtype=np.float64)
            np.add.at(acc, inv, m)
            self.example[name][uniq] += acc
            div = ex_div[name]  # per validation text
            self.example_norm[name][uniq] += np.divide(acc, div, out=np.zeros_like(acc), where=div > 0)
            cos = (per_example_cos or {}).get(name)
            if cos is not None:
                acc = np.zeros((len(uniq), m.shape[1]), dtype=np.float64)
                np.add.at(acc, inv, np.asarray(cos, dtype=np.float64))
                self.example_cos[name][uniq] += acc
                self.has_cos[0] = 1
        self._pending.append(
            pa.RecordBatch.from_arrays(
                [
                    pa.array(np.concatenate(step_col)),
                    pa.array(np.concatenate(doc_col).astype(str)),
                    pa.array(np.concatenate(set_col).astype(str)),
                    pa.array(np.concatenate(val_col)),
                    pa.array(np.concatenate(norm_col)),
                ],
                schema=STEP_SCHEMA,
            )
        )

    # ---- checkpoint support -------------------------------------------------------------------

    def flush(self, first_step: int, last_step: int) -> None:
        """Write the buffered step rows (steps `first_step..last_step`) as one atomic part file.

        Called right before a checkpoint is saved; the checkpoint makes the part count."""
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending, schema=STEP_SCHEMA)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.parts_dir / f"steps-{first_step:09d}-{last_step:09d}.parquet") as tmp:
            pq.write_table(table, tmp)
        self._pending = []

    def discard_after(self, step: int) -> None:
        """Delete step rows beyond `step` (the checkpoint being resumed): they will be recomputed."""
        self._pending = []
        for part in self._parts():
            if _part_range(part)[1] > step:
                part.unlink()

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Accumulators for the checkpoint (safetensors-compatible arrays)."""
        arrays = {
            "value": self.value,
            "value_norm": self.value_norm,
            "n_seen": self.n_seen,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "has_cos": self.has_cos,
        }
        for i, name in enumerate(self.example):
            arrays[f"example.{i}"] = self.example[name]
            arrays[f"example_norm.{i}"] = self.example_norm[name]
            arrays[f"example_cos.{i}"] = self.example_cos[name]
        return {k: np.ascontiguousarray(v) for k, v in arrays.items()}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore accumulators saved by `state_arrays` (shapes must match this corpus)."""
        for key in ("value", "value_norm", "n_seen", "first_step", "last_step"):
            current = getattr(self, key)
            saved = np.asarray(arrays[key])
            if saved.shape != current.shape:
                raise ValueError(f"checkpoint {key} has shape {saved.shape}, this run needs {current.shape}")
            setattr(self, key, saved.astype(current.dtype, copy=True))
        for i, name in enumerate(self.example):
            self.example[name] = np.asarray(arrays[f"example.{i}"], dtype=np.float64).copy()
            for key, acc in (("example_norm", self.example_norm), ("example_cos", self.example_cos)):
                saved = arrays.get(f"{key}.{i}")  # absent in checkpoints from before the views: unknown
                acc[name] = (
                    np.full_like(self.example[name], np.nan)
                    if saved is None
                    else np.asarray(saved, dtype=np.float64).copy()
                )
        self.has_cos = np.array([int(self.had_cosines(arrays))], dtype=np.int64)

    @staticmethod
    def had_cosines(arrays: Mapping[str, np.ndarray]) -> bool:
        """Whether the run that saved `arrays` (a checkpoint's) accumulated `value_cosine`; a checkpoint
        from before the flag was saved did, whenever it had per-example sets."""
        return bool(np.asarray(arrays.get("has_cos", np.ones(1))).reshape(-1)[0])

    # ---- final files --------------------------------------------------------------------------

    def finalize(self) -> dict[str, Path]:
        """Write doc_values, example_values, step_values and stage_values Parquet files."""
        paths = {
            "doc_values": self.out / "doc_values.parquet",
            "example_values": self.out / "example_values.parquet",
            "step_values": self.out / "step_values.parquet",
            "stage_values": self.out / "stage_values.parquet",
        }
        self._write_doc_values(paths["doc_values"])
        self._write_example_values(paths["example_values"])
        self._write_step_and_stage(paths["step_values"], paths["stage_values"])
        return paths

    def doc_values_frame(self) -> pd.DataFrame:
        """One row per (document, validation set), in corpus order then set order."""
        n_docs, n_sets = self.value.shape
        seen = self.n_seen > 0

        def step_col(a: np.ndarray) -> pd.Series:
            return pd.Series(np.tile(np.where(seen, a, 0), n_sets), dtype="Int64").where(
                np.tile(seen, n_sets)
            )

        return pd.DataFrame(
            {
                "doc_id": np.tile(self.doc_ids, n_sets),
                "source": np.tile(self.docs["source"].astype(str).to_numpy(), n_sets),
                "owner": np.tile(self.docs["owner"].astype(str).to_numpy(), n_sets),
                "val_set": np.repeat(np.array(self.set_names, dtype=object), n_docs),
                "value": self.value.T.reshape(-1),
                "value_normalized": self.value_norm.T.reshape(-1),
                "n_seen": np.tile(self.n_seen, n_sets),
                "first_step": step_col(self.first_step),
                "last_step": step_col(self.last_step),
            }
        )

    def _write_doc_values(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            self.doc_values_frame().to_parquet(tmp, index=False)

    def _write_example_values(self, path: Path) -> None:
        seen = np.flatnonzero(self.n_seen > 0)
        frames = []
        for name, m in self.example.items():
            ids = self.example_ids[name]
            frames.append(
                pd.DataFrame(
                    {
                        "doc_id": np.repeat(self.doc_ids[seen], len(ids)),
                        "val_set": name,
                        "val_id": np.tile(np.array(ids, dtype=object), len(seen)),
                        "value": m[seen].reshape(-1),
                        "value_normalized": self.example_norm[name][seen].reshape(-1),
                        "value_cosine": (
                            self.example_cos[name][seen].reshape(-1)
                            if self.has_cos[0]
                            else np.full(m[seen].size, np.nan)
                        ),
                    }
                )
            )
        empty = pd.DataFrame(
            {
                "doc_id": pd.Series(dtype=str),
                "val_set": pd.Series(dtype=str),
                "val_id": pd.Series(dtype=str),
                "value": pd.Series(dtype="float64"),
                "value_normalized": pd.Series(dtype="float64"),
                "value_cosine": pd.Series(dtype="float64"),
            }
        )
        frame = pd.concat(frames, ignore_index=True) if frames else empty
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)

    def _write_step_and_stage(self, step_path: Path, stage_path: Path) -> None:
        """Stream the part files into one Parquet file; sum them per window/source/set meanwhile."""
        source_of = dict(zip(self.doc_ids, self.docs["source"].astype(str), strict=True))
        stage: dict[tuple[int, str, str], np.ndarray] = {}
        max_step = 0
        with atomic_path(step_path) as tmp:
            writer = pq.ParquetWriter(tmp, STEP_SCHEMA)
            try:
                for part in self._parts():
                    table = pq.read_table(part, schema=STEP_SCHEMA)
                    writer.write_table(table)
                    frame = table.to_pandas()
                    if frame.empty:
                        continue
                    max_step = max(max_step, int(frame["step"].max()))
                    frame["window"] = (frame["step"] - 1) // self.stage_window
                    frame["source"] = frame["doc_id"].map(source_of)
                    grouped = frame.groupby(["window", "source", "val_set"], sort=True)[
                        ["value", "value_normalized"]
                    ].sum()
                    for key, row in grouped.iterrows():
                        acc = stage.setdefault((int(key[0]), key[1], key[2]), np.zeros(2))
                        acc += row.to_numpy(dtype=np.float64)
            finally:
                writer.close()
        rows = [
            {
                "window_start": w * self.stage_window + 1,
                "window_end": min((w + 1) * self.stage_window, max_step),
                "source": source,
                "val_set": name,
                "value": acc[0],
                "value_normalized": acc[1],
            }
            for (w, source, name), acc in sorted(stage.items())
        ]
        columns = ["window_start", "window_end", "source", "val_set", "value", "value_normalized"]
        frame = pd.DataFrame(rows, columns=columns).astype(
            {
                "window_start": "int64",
                "window_end": "int64",
                "value": "float64",
                "value_normalized": "float64",
            }
        )
        with atomic_path(stage_path) as tmp:
            frame.to_parquet(tmp, index=False)

    def _parts(self) -> list[Path]:
        if not self.parts_dir.exists():
            return []
        return sorted(self.parts_dir.glob("steps-*.parquet"), key=_part_range)

    def describe(self) -> ValuesInfo:
        """What the manifest records about the value definitions and the views readers compute."""
        return ValuesInfo(
            normalization=NORMALIZATION_RULE,
            stage_window=self.stage_window,
            per_example_sets={k: len(v) for k, v in self.example_ids.items()},
            default_view=self.default_view,
            views=_view_docs(),
        )


def _view_docs() -> dict[str, dict[str, str]]:
    """Each view's meaning and use, for the manifest; royalties always use the raw `value`."""
    return {
        name: {"column": column_of(name), "meaning": v.meaning, "use": v.use} for name, v in VIEWS.items()
    }


def _part_range(path: Path) -> tuple[int, int]:
    _, first, last = path.stem.split("-")
    return int(first), int(last)
