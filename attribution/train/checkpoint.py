"""Checkpoints that survive `kill -9` at any instant and never need unpickling.

Layout (`<out>/checkpoints/`): `model.safetensors`, `optimizer.safetensors` (every tensor of the
optimizer state, flattened), `store.safetensors` (the value store's float64 accumulators),
`rng.safetensors` (torch RNG states) and `state.json` (step, sampler position, optimizer
hyper-parameters, config, written last).

Atomicity across several files: a new checkpoint is written complete into a fresh sibling folder,
then swapped in with two renames (`checkpoints` -> `.checkpoints.old`, new -> `checkpoints`). A
crash between the renames leaves `.checkpoints.old`, which `load_checkpoint` renames back, so
there is always exactly one complete checkpoint to resume from.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CHECKPOINT_DIR = "checkpoints"
_OLD = ".checkpoints.old"
_NEW_PREFIX = ".checkpoints.new-"


@dataclass
class Checkpoint:
    """What `load_checkpoint` found: the JSON state and the store arrays (model/optimizer are loaded in place)."""

    state: dict[str, Any]
    arrays: dict[str, np.ndarray]
    path: Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def optimizer_to_tensors(optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and JSON (everything else)."""
    import torch

    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            name = f"state.{pid}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().contiguous().cpu()
            else:
                scalars[name] = value
    groups = json.loads(json.dumps(sd["param_groups"], default=list))
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(optimizer, tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Inverse of `optimizer_to_tensors`, loaded into `optimizer` in place."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group and isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def write_training_state(
    folder: Path, model, optimizer, state: Mapping[str, Any], rng: Mapping[str, Any] | None
) -> None:
    """Model, optimizer, RNG and `state.json` (written last, with the optimizer's JSON part) into `folder`,
    each file fsynced: what both the latest checkpoint and a replay-chain link hold."""
    from safetensors.torch import save_file, save_model

    save_model(model, str(folder / "model.safetensors"))
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    save_file(opt_tensors, str(folder / "optimizer.safetensors"))
    save_file({k: v.contiguous() for k, v in (rng or {}).items()}, str(folder / "rng.safetensors"))
    with open(folder / "state.json", "w", encoding="utf-8") as fh:
        json.dump({**state, "optimizer": opt_meta}, fh, indent=2, default=str)
    for f in folder.iterdir():
        _fsync_file(f)


def save_checkpoint(
    out: str | Path,
    model,
    optimizer,
    state: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    rng: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint and swap it in atomically. Returns the checkpoint folder."""
    from safetensors.numpy import save_file as save_numpy

    out = Path(out)
    final = out / CHECKPOINT_DIR
    new = out / f"{_NEW_PREFIX}{os.getpid()}"
    if new.exists():
        shutil.rmtree(new)
    new.mkdir(parents=True)
    save_numpy({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(new / "store.safetensors"))
    write_training_state(new, model, optimizer, state, rng)
    _fsync_dir(new)
    old = out / _OLD
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    _fsync_dir(out)
    if old.exists():
        shutil.rmtree(old)
    return final


def recover(out: str | Path) -> Path | None:
    """Repair an interrupted swap and drop half-written folders; return the checkpoint folder or None."""
    out = Path(out)
    final, old = out / CHECKPOINT_DIR, out / _OLD
    if not (final / "state.json").exists() and (old / "state.json").exists():
        if final.exists():
            shutil.rmtree(final)
        os.replace(old, final)
    for stale in out.glob(f"{_NEW_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return final if (final / "state.json").exists() else None


def load_checkpoint(out: str | Path, model, optimizer, device: str = "cpu") -> Checkpoint | None:
    """Load model and optimizer in place from `<out>/checkpoints`; None if there is no checkpoint."""
    from safetensors.numpy import load_file as load_numpy
    from safetensors.torch import load_file, load_model

    folder = recover(out)
    if folder is None:
        return None
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    load_model(model, str(folder / "model.safetensors"), device=str(device))
    optimizer_from_tensors(
        optimizer, load_file(str(folder / "optimizer.safetensors"), device=str(device)), state["optimizer"]
    )
    arrays = load_numpy(str(folder / "store.safetensors"))
    rng = load_file(str(folder / "rng.safetensors"))
    state["rng"] = rng
    return Checkpoint(state=state, arrays=arrays, path=folder)
