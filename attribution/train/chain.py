"""The replay chain: the checkpoints an exact replay of a run's trajectory needs.

Why: a text that arrives after training (a claim) can only be valued against the steps the run
actually took by replaying them. Replay starts from a kept checkpoint, takes the same batches and
the same optimizer steps, and must land on the next kept checkpoint bit for bit (CPU float32), which
is what makes its values the run's own. The latest-checkpoint folder (`checkpoint.py`) is swapped
wholesale at every save, so the chain lives beside it:

    <out>/replay/step_0000000/   the step-0 weights (before any update)
    <out>/replay/step_0000020/   every `keep_every` steps, and the last step
        model.safetensors  optimizer.safetensors  rng.safetensors  state.json
    <out>/replay/chain.json      step -> sha256 and size of each link, plus `keep_every`

Each link is written complete into a hidden sibling folder and renamed into place, so a kill -9
leaves whole links only; `chain.json` is rewritten atomically after each link. The hashes are
checked before a link is loaded, so a tampered or corrupted file is named before any work uses it.
Segments between consecutive links are independent: replay can run them in parallel.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attribution.errors import UserError
from attribution.io import atomic_write

REPLAY_DIR = "replay"
INDEX = "chain.json"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


@dataclass(frozen=True)
class Link:
    """One kept checkpoint of the chain."""

    step: int
    path: Path
    sha256: dict[str, str]
    bytes: int


def link_dir(out: str | Path, step: int) -> Path:
    return Path(out) / REPLAY_DIR / f"step_{int(step):07d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_index(out: str | Path) -> dict[str, Any] | None:
    """`chain.json`, or None when the run kept no chain."""
    path = Path(out) / REPLAY_DIR / INDEX
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None


def _write_index(out: Path, index: dict[str, Any]) -> None:
    with atomic_write(out / REPLAY_DIR / INDEX) as fh:
        json.dump(index, fh, indent=2, sort_keys=True)


def save_link(
    out: str | Path, step: int, model, optimizer, state: dict[str, Any], rng: dict[str, Any], keep_every: int
) -> Link:
    """Write the link for `step` (model, optimizer, RNG, sampler position in `state`) atomically."""
    from attribution.train.checkpoint import write_training_state

    out = Path(out)
    final = link_dir(out, step)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_training_state(tmp, model, optimizer, {**state, "step": int(step)}, rng)
    if final.exists():  # a link rewritten after a resume: the trajectory is deterministic
        shutil.rmtree(final)
    os.replace(tmp, final)
    hashes = {name: _sha256(final / name) for name in FILES}
    size = sum((final / name).stat().st_size for name in FILES)
    index = read_index(out) or {"keep_every": int(keep_every), "links": {}}
    index["keep_every"] = int(keep_every)
    index["links"][str(int(step))] = {"sha256": hashes, "bytes": size}
    _write_index(out, index)
    return Link(int(step), final, hashes, size)


def links(out: str | Path) -> list[Link]:
    """The chain's links in step order (empty when the run kept none)."""
    index = read_index(out)
    if not index:
        return []
    return [
        Link(int(s), link_dir(out, int(s)), e["sha256"], int(e["bytes"]))
        for s, e in sorted(index["links"].items(), key=lambda kv: int(kv[0]))
    ]


def discard_after(out: str | Path, step: int) -> None:
    """On resume from `step`: drop links beyond it (they are rewritten, identically, as training goes)."""
    out = Path(out)
    index = read_index(out)
    root = out / REPLAY_DIR
    for stale in root.glob(".step_*.tmp-*") if root.exists() else []:
        shutil.rmtree(stale, ignore_errors=True)
    if not index:
        return
    for s in [s for s in index["links"] if int(s) > step]:
        del index["links"][s]
        shutil.rmtree(link_dir(out, int(s)), ignore_errors=True)
    _write_index(out, index)


def check_link(link: Link) -> None:
    """Refuse a link whose files do not hash to what the chain recorded (one line naming the file)."""
    for name, want in link.sha256.items():
        path = link.path / name
        if not path.is_file():
            raise UserError(f"{path}: kept checkpoint file is missing (step {link.step})")
        if _sha256(path) != want:
            raise UserError(
                f"{path}: content hash differs from the run's record (step {link.step}): "
                "the checkpoint was altered or corrupted"
            )


def load_link(link: Link, model, optimizer, device: str = "cpu") -> dict[str, Any]:
    """Verify the link's hashes, then load model and optimizer in place; returns its state (with `rng`)."""
    from safetensors.torch import load_file, load_model

    from attribution.train.checkpoint import optimizer_from_tensors

    check_link(link)
    state = json.loads((link.path / "state.json").read_text(encoding="utf-8"))
    load_model(model, str(link.path / "model.safetensors"), device=str(device))
    optimizer_from_tensors(
        optimizer, load_file(str(link.path / "optimizer.safetensors"), device=str(device)), state["optimizer"]
    )
    state["rng"] = load_file(str(link.path / "rng.safetensors"))
    return state


def deviation(model, link: Link) -> float:
    """Largest absolute difference between `model`'s weights and the link's (0.0 = bitwise equal)."""
    import torch
    from safetensors.torch import load_file

    check_link(link)
    stored = load_file(str(link.path / "model.safetensors"))
    worst = 0.0
    state = model.state_dict()
    for name, want in stored.items():
        got = state[name].detach().cpu()
        if got.shape != want.shape:
            return float("inf")
        if not torch.equal(got, want.to(got.dtype)):
            worst = max(worst, float((got.double() - want.double()).abs().max()))
    return worst


def storage(out: str | Path) -> int:
    """Bytes the chain holds on disk."""
    return sum(link.bytes for link in links(out))
