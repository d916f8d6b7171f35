"""`manifest.json`, typed: what a run directory says about how it was made and what its numbers mean.

Why one class: the training loop writes the manifest and half a dozen readers (report, compare,
curate, the experiment, the notebook API) need facts from it. Each used to parse the JSON itself and
guess where a key lives; now they read typed fields here, and the layout is defined in one place.

Schema versions: version 2 (written since this module exists) carries `schema_version` and names the
default attribution view only under `values.default_view`. Version 1 manifests (no `schema_version`;
a top-level `"default_view"` that named an `example_values` column, next to `values.default_view`)
still load: their default view comes from `values.default_view` when present, else from the old key.
Unknown keys are kept in `extra`, so reading and writing a manifest loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attribution.errors import BadInputError, UserError
from attribution.io import atomic_write

SCHEMA_VERSION = 2
FILENAME = "manifest.json"
ATTRIBUTION_COLUMN = "attribution"  # the name the default view goes by in frames with every view


def _known(cls: type, raw: Any) -> dict[str, Any]:
    """The keys of `raw` that are fields of dataclass `cls` (a foreign or older manifest may lack some)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names} if isinstance(raw, dict) else {}


@dataclass
class CorpusInfo:
    """The training corpus: the specs given, its content fingerprint, and what was kept out."""

    specs: list[str] = field(default_factory=list)
    fingerprint: str | None = None
    n_docs_total: int | None = None
    n_docs_trained: int | None = None
    n_sequences: int | None = None
    excluded_ids: int | list[str] | None = None  # how many ids were excluded (older runs: the ids)
    identical_to_validation: list[str] = field(default_factory=list)


@dataclass
class ValSetInfo:
    """One validation set: where it came from and how it was valued."""

    path: str | None = None
    n_docs: int | None = None
    n_sequences: int | None = None
    per_example: bool = False


@dataclass
class TrainingInfo:
    """What the training loop did: steps, hardware, the In-Run Shapley order and value formula."""

    total_steps: int | None = None
    device: str | None = None
    dtype: str | None = None
    world_size: int | None = None
    tokens_per_step: int | None = None
    order: int | None = None
    optimizer: str | None = None
    values: str | None = None  # "sgd-proxy" or "adam-aware"
    clip: str | None = None
    weight_decay_credit: str | None = None
    threads: int | None = (
        None  # torch intra-op threads: float32 sums depend on them, so claim replay uses the same
    )


@dataclass
class ValuesInfo:
    """How the value files are defined (`attribution.train.store`) and which view is the default."""

    normalization: str | None = None
    stage_window: int | None = None
    per_example_sets: dict[str, int] = field(default_factory=dict)
    default_view: str | None = None
    views: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Any) -> ValuesInfo | None:
        if not isinstance(raw, dict):
            return None
        known = _known(cls, raw)
        view = known.get("default_view")
        known["default_view"] = view.get("view") if isinstance(view, dict) else view
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["default_view"] = {"view": self.default_view, "column": ATTRIBUTION_COLUMN}
        return out


@dataclass
class Timings:
    """Wall-clock facts (seconds since the epoch, durations in seconds); the first session's start is kept."""

    started: float | None = None
    finished: float | None = None
    train_seconds: float | None = None
    tokens_per_s: float | None = None
    resumed_at: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v != []}


@dataclass
class Manifest:
    """A run's manifest. `read`/`write` go through `manifest.json`; `to_dict` is its JSON layout."""

    status: str = "complete"
    config: dict[str, Any] = field(default_factory=dict)
    config_sources: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    corpus: CorpusInfo = field(default_factory=CorpusInfo)
    val_sets: dict[str, ValSetInfo] = field(default_factory=dict)
    training: TrainingInfo = field(default_factory=TrainingInfo)
    values: ValuesInfo | None = None
    final_val_loss: dict[str, float] | None = None
    timings: Timings = field(default_factory=Timings)
    peak_rss_mb: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: str | None = None
    resumed_from: list[int] = field(default_factory=list)
    # the FAISS indexes `claim --fast` searches, by folder: what each holds (`checkpoint_sketch.describe`)
    indexes: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they were

    # ---- reading and writing ------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        """Build from the JSON layout of any schema version (missing sections get their defaults)."""
        typed = {"corpus", "val_sets", "training", "values", "timings", "schema_version"}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "schema_version"}
        plain = {k: v for k, v in raw.items() if k in names and k not in typed}
        extra = {k: v for k, v in raw.items() if k not in names and k != "schema_version"}
        sets = raw.get("val_sets")
        return cls(
            **plain,
            schema_version=int(raw.get("schema_version", 1)),
            corpus=CorpusInfo(**_known(CorpusInfo, raw.get("corpus"))),
            val_sets={str(k): ValSetInfo(**_known(ValSetInfo, v)) for k, v in sets.items()}
            if isinstance(sets, dict)
            else {},
            training=TrainingInfo(**_known(TrainingInfo, raw.get("training"))),
            values=ValuesInfo.from_dict(raw.get("values")),
            timings=Timings(**_known(Timings, raw.get("timings"))),
            extra=extra,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of schema version 2 (the keys in the order the training loop always wrote them)."""
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "status": self.status,
            "config": self.config,
            "config_sources": self.config_sources,
            "seed": self.seed,
            "corpus": dataclasses.asdict(self.corpus),
            "val_sets": {k: dataclasses.asdict(v) for k, v in self.val_sets.items()},
            "training": dataclasses.asdict(self.training),
            "values": self.values.to_dict() if self.values is not None else None,
            "final_val_loss": self.final_val_loss,
            "timings": self.timings.to_dict(),
            "peak_rss_mb": self.peak_rss_mb,
            "versions": self.versions,
            "git_commit": self.git_commit,
            "resumed_from": self.resumed_from,
            "indexes": self.indexes,
        }
        return {**out, **{k: v for k, v in self.extra.items() if k not in out}}

    @classmethod
    def read(cls, run_dir: str | Path) -> Manifest:
        """`run_dir/manifest.json`; UserError when it is missing, BadInputError (file, line) when malformed."""
        path = Path(run_dir) / FILENAME
        if not path.is_file():
            raise UserError(f"{path}: missing; is this a run directory written by `attribution run`?")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise BadInputError(path, exc.lineno, f"not JSON: {exc.msg}") from None
        except UnicodeDecodeError as exc:
            raise BadInputError(path, None, f"not UTF-8 text: {exc.reason}") from None
        if not isinstance(raw, dict):
            raise BadInputError(path, 1, "expected a JSON object")
        try:
            return cls.from_dict(raw)
        except (TypeError, ValueError) as exc:
            raise BadInputError(path, None, f"unexpected manifest layout: {exc}") from None

    def write(self, run_dir: str | Path) -> Path:
        """Write `run_dir/manifest.json` atomically (pretty JSON, as before)."""
        path = Path(run_dir) / FILENAME
        with atomic_write(path) as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=False, default=str)
            fh.write("\n")
        return path

    # ---- what readers ask ---------------------------------------------------------------------

    @property
    def default_view(self) -> str:
        """The attribution view the run recommends for "which documents is this text derived from?".

        Version 2: `values.default_view`. Version 1 also had a top-level `default_view` naming an
        `example_values` column ("value", "attribution" or "view_<name>"); it counts only when the
        values section names none. With neither, the package's default (`attribution.values.views`)."""
        from attribution.values.views import DEFAULT_VIEW

        if self.values is not None and self.values.default_view:
            return self.values.default_view
        old = self.extra.get("default_view")
        if isinstance(old, str) and old:
            return DEFAULT_VIEW if old == ATTRIBUTION_COLUMN else old.removeprefix("view_")
        return DEFAULT_VIEW

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps the run took (the configured steps when the training section lacks them)."""
        steps = (
            self.training.total_steps if self.training.total_steps is not None else self.config.get("steps")
        )
        return int(steps) if isinstance(steps, int | float) else None

    @property
    def order(self) -> int | None:
        order = self.training.order if self.training.order is not None else self.config.get("order")
        return int(order) if isinstance(order, int | float) else None

    @property
    def optimizer_aware(self) -> bool | None:
        """True for Adam-preconditioned values, False for the SGD proxy, None when not recorded."""
        if self.training.values is not None:
            return "aware" in self.training.values.lower()
        aware = self.config.get("optimizer_aware")
        return bool(aware) if aware is not None else None

    def model(self) -> dict[str, Any]:
        """The model's preset and shape as configured (keys that are unset are left out)."""
        keys = ("preset", "n_layer", "n_embd", "n_head", "seq_len")
        return {k: self.config[k] for k in keys if self.config.get(k) is not None}

    def is_complete(self, config: Any) -> bool:
        """The "reuse a finished run" check: this run finished, with exactly `config` (a resolved RunConfig)."""
        return self.status == "complete" and self.config == json.loads(json.dumps(config.to_json()))
