"""`RunConfig`: everything that decides what a run trains and values, from flags, TOML or Python.

Precedence, lowest first: preset -> TOML file (`--config run.toml`) -> command-line flags / Python
arguments. `resolved()` returns a copy with every `None` filled from the preset, and that resolved
copy (plus where each part came from) is what goes into `manifest.json`, so a run can be repeated
from its manifest alone.

TOML keys are the field names below, e.g.::

    corpus = ["builtin"]
    out = "runs/x"
    preset = "cpu-tiny"
    steps = 200
    [val]
    rewrites = "val/rewrites.jsonl"
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attribution.errors import UserError
from attribution.train.presets import PRESETS


@dataclass
class RunConfig:
    """One training-and-valuation run. Fields left `None` come from the preset."""

    corpus: list[str] = field(default_factory=lambda: ["builtin"])
    val: dict[str, str] = field(default_factory=dict)
    out: str = "runs/run"
    preset: str = "cpu-tiny"
    steps: int | None = None
    epochs: float | None = None
    order: int = 1
    optimizer: str = "adamw"
    seed: int = 0
    exclude_ids: tuple[str, ...] = ()
    # Documents that must be trained on (e.g. an experiment's originals): never taken into the reference set.
    keep_ids: tuple[str, ...] = ()
    device: str = "auto"
    resume: bool = False
    # Valuation switches.
    value: bool = True  # False = plain training (throughput baseline); no value files are written
    per_example_max: int = 64  # per-example values for validation sets with at most this many documents
    # Adam-preconditioned values when the optimizer is AdamW (the step actually taken); False = the SGD
    # proxy of the paper. Ignored under SGD. Why the default: docs/benchmarks.md, "Optimizer-aware by default".
    optimizer_aware: bool = True
    sketch: bool = (
        True  # in-run gradient sketches as a FAISS index for `claim --fast` (attribution.train.sketch)
    )
    # checkpoint similarity after training (attribution.workflows.checkpoint_similarity): the default view's input
    checkpoint_view: bool = True
    # ghost per-sample gradient norms in every valued step, for the in-run cosine views (`value_cosine`:
    # cosine, contrast_cosine, standout_cosine). None = only when the run has no checkpoint view (no
    # replay chain or --no-checkpoint-view), whose in-run default view needs them; with a checkpoint view
    # they are a fallback that costs about 7% of a GPT-2-small step (docs/benchmarks.md, "Session 15")
    in_run_cosine: bool | None = None
    sketch_dim: int = 512  # dimension of the sketch vectors (1 KiB float16 per document; sketch.DEFAULT_DIM)
    sketch_kind: str = "tensor"  # first stage of the sketch: "tensor" or "kronecker" (sketch.KINDS)
    sketch_mix: str = "shared"  # one mix for every segment, or "segment": one per segment (sketch.MIXES)
    sketch_width: int | None = None  # tensor sketch's first-stage width (None: sketch.WIDTH)
    sketch_side: int | None = None  # Kronecker side of a "kronecker" sketch (None: sketch.SIDE)
    # Model and optimizer (None = from preset).
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    seq_len: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    clip: float | None = None
    dtype: str | None = None  # auto | float32 | float64 | bfloat16
    # Bookkeeping (None = from preset).
    eval_every: int | None = None
    log_every: int | None = None
    checkpoint_every: int | None = None
    reference: int | None = (
        None  # documents held out as the fixed reference set of the contrast views; 0 = none
    )
    # texts added to the reference set, whole, besides the documents it samples from the corpus: reference
    # texts in the register of the texts to be attributed (`--reference-texts`; never trained on)
    reference_texts: tuple[str, ...] = ()
    keep_every: int | None = None  # replay chain: keep a checkpoint every K steps (and step 0); 0 = none
    stage_window: int | None = None
    cache_dir: str | None = None  # token cache; default: <out>/../.cache/tokens shared by runs
    progress: bool = True

    def resolved(self) -> RunConfig:
        """A copy with preset values filled in and checked; raises UserError on a bad combination."""
        if self.preset not in PRESETS:
            raise UserError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[self.preset]
        values = dataclasses.asdict(self)
        for key, default in preset.items():
            if key == "steps":
                continue
            if values.get(key) is None:
                values[key] = default
        if values["steps"] is None and values["epochs"] is None:
            values["steps"] = preset["steps"]
        if values["in_run_cosine"] is None:
            values["in_run_cosine"] = not (values["checkpoint_view"] and values["keep_every"])
        for key in TUPLE_FIELDS:
            values[key] = tuple(values[key])
        values["corpus"] = list(values["corpus"])
        values["val"] = dict(values["val"])
        cfg = RunConfig(**values)
        cfg._check()
        return cfg

    def _check(self) -> None:
        if self.order not in (1, 2):
            raise UserError(f"--order must be 1 or 2, got {self.order}")
        if self.optimizer not in ("adamw", "sgd"):
            raise UserError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.steps is not None and self.epochs is not None:
            raise UserError("give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise UserError("--steps must be at least 1")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise UserError("--epochs must be a positive number")
        if not self.corpus:
            raise UserError("give at least one --corpus")
        if self.value and not self.val:
            raise UserError("give at least one validation set: --val NAME=PATH")
        if "reference" in self.val:
            raise UserError(
                "the validation-set name 'reference' is reserved for the run's fixed reference set"
            )
        if self.reference is not None and self.reference < 0:
            raise UserError("--reference must be 0 (none) or a number of documents")
        for name in self.val:
            if not name or "/" in name or name.startswith("."):
                raise UserError(f"bad validation-set name {name!r}: use letters, digits, - and _")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.keep_every is not None and self.keep_every < 0:
            raise UserError("--keep-every must be 0 (no replay chain) or a positive number of steps")
        if self.sketch_side is not None and self.sketch_side < 1:
            raise UserError(f"--sketch-side must be a positive number, got {self.sketch_side}")
        if self.sketch_width is not None and self.sketch_width < 1:
            raise UserError(f"--sketch-width must be a positive number, got {self.sketch_width}")
        if self.sketch_kind not in ("tensor", "kronecker"):
            raise UserError(f"--sketch-kind must be tensor or kronecker, got {self.sketch_kind!r}")
        if self.sketch_mix not in ("shared", "segment"):
            raise UserError(f"--sketch-mix must be shared or segment, got {self.sketch_mix!r}")
        if self.sketch_side is not None and self.sketch_kind != "kronecker":
            raise UserError(
                "--sketch-side sets the Kronecker sketch's side: use it with --sketch-kind kronecker"
            )
        if self.sketch_width is not None and self.sketch_kind != "tensor":
            raise UserError("--sketch-width sets the tensor sketch's width: use it with --sketch-kind tensor")
        if self.sketch_dim < 1:
            raise UserError(f"--sketch-dim must be a positive number, got {self.sketch_dim}")
        if self.dtype not in ("auto", "float32", "float64", "bfloat16"):
            raise UserError(f"dtype must be auto, float32, float64 or bfloat16, got {self.dtype!r}")

    @classmethod
    def of_run(cls, recorded: Mapping[str, Any]) -> RunConfig:
        """The config a run's manifest records, as a RunConfig: keys this code no longer knows are
        dropped, lists become the tuples the fields hold, and a run from before `in_run_cosine` existed
        is read as what it did (it computed the norms whenever it had per-example sets)."""
        data = {k: v for k, v in recorded.items() if k in FIELDS}
        data.setdefault("in_run_cosine", True)
        return build_config(None, **data)

    @property
    def adam_aware(self) -> bool:
        """Values are Adam-preconditioned: asked for, and the optimizer has a second moment."""
        return bool(self.optimizer_aware) and self.optimizer == "adamw"

    def total_steps(self, n_sequences: int) -> int:
        """Number of optimizer steps: `steps`, or enough batches to cover `epochs` passes."""
        if self.steps is not None:
            return int(self.steps)
        return max(1, math.ceil(float(self.epochs) * n_sequences / int(self.batch_size)))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["exclude_ids"] = list(self.exclude_ids)
        out["keep_ids"] = list(self.keep_ids)
        out["betas"] = list(self.betas) if self.betas is not None else None
        return out


FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
# fields held as tuples (TOML, JSON and click give lists): one place turns them back
TUPLE_FIELDS = ("betas", "exclude_ids", "keep_ids", "reference_texts")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a run config TOML; unknown keys are an error (a typo must not be silently ignored)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{p}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{p}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise UserError(f"{p}: unknown config keys: {', '.join(unknown)}")
    if "corpus" in data and isinstance(data["corpus"], str):
        data["corpus"] = [data["corpus"]]
    return data


def build_config(toml_path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """Config from an optional TOML file with `overrides` (flags actually given) on top."""
    data: dict[str, Any] = load_toml(toml_path) if toml_path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    for key in TUPLE_FIELDS:
        if key in data and data[key] is not None:
            data[key] = tuple(data[key])
    try:
        return RunConfig(**data)
    except TypeError as exc:
        raise UserError(f"bad run configuration: {exc}") from None
