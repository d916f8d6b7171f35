"""In-run gradient sketches: every training document's weighted gradient, projected, as a FAISS index.

Why: exact claim replay (`attribution.workflows.claim`) re-runs training. A sketch made while the run
trains lets `attribution claim --fast` answer in seconds with one inner product per document, and
then confirm only the top candidates by targeted exact replay.

The projection `R_s` of segment s (the steps between two kept checkpoints of the replay chain) is
`M_s S`: a fixed first stage `S` computed from the engine's captured token factors, so no per-sample
gradient is ever materialized, then a Gaussian `M_s` that mixes it into `dim` numbers. `S` is a tensor
sketch of the whole gradient into `WIDTH` numbers (`TensorProjection`, the default) or per-parameter
Kronecker blocks `R0 (x) R1` (`KroneckerProjection`, `--sketch-kind kronecker`). Both have
`E[S^T S] = I`, as does `M_s`, so inner products of sketches are unbiased estimates of gradient dot
products.

A document's vector is `sum over its sequences and steps of lr * clip factor * loss weight * R_s g`, and a
claim's is `sum_s R_s g_claim(segment s)` (the trapezoid of the kept checkpoints around each segment), so
the dimension does not grow with the number of segments (memory: n_docs x dim). With one shared `M` (the
default, `mix = shared`) the score is `<sum_s g_claim(s), weighted sum of the document's g>`: every
segment's claim gradient meets the document's whole training, a TrackStar-like similarity over the kept
checkpoints. With an independent `M_s` per segment (`mix = segment`, runs before session 9) the
cross-segment terms vanish in expectation, so the score estimates `sum_s <g_claim(s), the document's g in
s>` without bias, but each of them adds its full size as noise; on the optimizer-aware demo that noise
buried the originals (docs/benchmarks.md, "Session 9").
For optimizer-aware runs the value is `lr c w <K_t g_claim, g_z>` with Adam's elementwise
preconditioner `K_t` of the step, so `K_t` is split between the two sides: the document side takes
`F_t = a b^T`, the rank-1 matrix closest to `sqrt|K_t|` in log space (`balance`), which keeps the
per-sample gradient factored (`(a * row)(b * col)^T`) and so costs what the SGD sketch costs; the claim
side takes `K / F` at each kept checkpoint (`attribution.workflows.claim_fast`). Why split: with all of
`K` on the claim side (runs before the split), `K g_claim` is dominated by the coordinates of tiny
second moment and the projection noise `|K g_claim| |g_z| / sqrt(dim)` buried the signal (fidelity near
chance on the copyright experiment, docs/benchmarks.md); the split balances the two norms, as
TrackStar's Adam normalization of both sides does, and the document side follows `K_t` step by step.
"""

from __future__ import annotations

import bisect
import json
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attribution.engine.capture import Captured
from attribution.engine.rules import Use
from attribution.engine.scoring import factor_dtype
from attribution.engine.strategies.materialize import materialize
from attribution.errors import UserError
from attribution.io import atomic_path, atomic_write

SIDE = 32  # Kronecker projection (`--sketch-kind kronecker`, runs before session 9): per-parameter side
# First-stage width of the tensor sketch (`--sketch-kind tensor`): one count sketch of the whole gradient,
# so its error is about that of a WIDTH-dimensional projection before the final mix to `dim`. 2048 is the
# largest whose in-run cost stays under 10% of the optimizer-aware demo's valued step (8.9%; 4096: 11.9%).
WIDTH = 2048
KINDS = ("tensor", "kronecker")
MIXES = ("shared", "segment")
# Why a tensor first stage and one shared mix (docs/benchmarks.md, "Session 9"): chosen on the
# optimizer-aware demo's own rewrites, where it led on every measure at dim 512 (Spearman 0.25 / 0.21 under
# the default view / raw value against 0.09 / 0.12 for Kronecker with a mix per segment; the original's
# rank 18.6 / 17.3 against 30.0 / 27.6). Independent per-segment mixes make cross-segment terms vanish
# only in expectation: each adds every other segment's claim vector as noise. Cost: 8.9% of a valued step.
DEFAULT_KIND = "tensor"
DEFAULT_MIX = "shared"
# Index dimension: the largest whose exhaustive float16 search of 1M documents stays under 50 ms (37 ms
# p50 at 512, 70 ms at 1024); 1 KiB per document. Chosen on the demo's own rewrites (docs/benchmarks.md,
# "Sketch fidelity"): it finds more of the exact top 10 than 256 there.
DEFAULT_DIM = 512
SKETCH_DIR = "sketch"
INDEX = "index.faiss"
UNIT_INDEX = "index_unit.faiss"
META = "meta.json"
STORAGE = "faiss IndexScalarQuantizer QT_fp16, inner product, exhaustive; vectors divided by meta scale"


BALANCED = "balanced"  # meta["preconditioner"]: documents carry F_t = balance(K_t), claims K / F


def balance(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(a, b)` with `a b^T` the rank-1 fit of `sqrt|k|` in log space (`k`: canonical `[P0, P1]`).

    Least squares on `log sqrt|k|` gives row and column log-means (Adafactor's factorization, in log space
    so the few huge entries of tiny second moment do not dominate). `|k|` is clipped to 1e-12 of its
    largest entry first: the path rule's `K` may be zero or negative in a coordinate, and the split only
    needs a positive balance, since the claim side divides by the same `a b^T` it computes."""
    mag = k.detach().abs().to(torch.float64)
    top = float(mag.max()) if mag.numel() else 0.0
    if top <= 0:
        return torch.ones(k.shape[0], dtype=torch.float64), torch.ones(k.shape[1], dtype=torch.float64)
    log = mag.clamp_min_(top * 1e-12).log_().mul_(0.5)
    rows = log.mean(dim=1)
    cols = log.mean(dim=0) - log.mean()
    return rows.exp(), cols.exp()


def balanced_claim_side(k: Mapping[int, torch.Tensor], params: Mapping[int, torch.nn.Parameter]) -> dict:
    """`K / (a b^T)` per parameter id: the claim side's share of the split (`balance`)."""
    from attribution.engine.rules import canonical_shape

    out = {}
    for pid, kk in k.items():
        shape = canonical_shape(params[pid])
        a, b = balance(kk.reshape(shape))
        f = torch.outer(a, b).to(kk.device, kk.dtype).reshape(kk.shape)
        out[pid] = kk / f
    return out


def segments(keep_every: int, total: int) -> list[tuple[int, int]]:
    """`(start, end]` step ranges between the replay chain's links (one segment when none are kept)."""
    bounds = [0, *range(keep_every, total, keep_every), total] if keep_every else [0, total]
    return list(zip(bounds, bounds[1:], strict=False))


def segment_of(segs: Sequence[tuple[int, int]], step: int) -> int:
    """Index of the segment that trains 1-based `step`."""
    return bisect.bisect_left([end for _, end in segs], step)


class Projection:
    """`R_s` for one model: a first stage per parameter, then a Gaussian mix `M_s` to `dim`.

    `mix`: `shared` (one `M` for every segment) or `segment` (an independent `M_s` per segment, the
    runs before session 9).

    The first stage (`first_stage`, `first_stage_dense`) is the subclass's: `TensorProjection` (the
    default) or `KroneckerProjection` (older runs, `--sketch-kind kronecker`). Seeded by `seed` and the parameter names only, so
    training and `claim --fast` draw the same matrices in different processes. `params`: name ->
    canonical shape, in the model's order. `width`: the first stage's output size.
    """

    kind = ""
    width = 0

    def __init__(self, params: Mapping[str, tuple[int, int]], dim: int, seed: int, mix: str = "segment"):
        if mix not in MIXES:
            raise ValueError(f"sketch mix {mix!r}: expected one of {', '.join(MIXES)}")
        self.params = dict(params)
        self.dim, self.seed, self.mix_kind = int(dim), int(seed), mix
        self._mix: tuple[tuple[int, torch.device, torch.dtype], torch.Tensor] | None = None

    def _key(self) -> list:
        """What, besides the seed, keys this kind's random draws (so kinds never share matrices)."""
        raise NotImplementedError

    def _generator(self, *key: int) -> torch.Generator:
        return torch.Generator().manual_seed(zlib.crc32(json.dumps([self.seed, *self._key(), *key]).encode()))

    def _gaussian(self, rows: int, cols: int, *key: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=self._generator(*key), dtype=torch.float64) / rows**0.5

    def mixer(self, segment: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`M_s^T` (`[width, dim]`), kept for the segment in use (segment 0's for every segment when shared)."""
        segment = 0 if self.mix_kind == "shared" else int(segment)
        key = (segment, device, dtype)
        if self._mix is None or self._mix[0] != key:
            self._mix = (key, self._gaussian(self.dim, self.width, -1, int(segment)).t().to(device, dtype))
        return self._mix[1]

    def first_stage(
        self,
        cap: Captured,
        names: Mapping[int, str],
        scales: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """`[n, width]`: the first stage of every sample's `F * g` from the captured factors (no gradient is
        built). `scales`: name -> `(a, b)` of `F = a b^T` (`balance`); none = `F = 1`."""
        raise NotImplementedError

    def first_stage_dense(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """`[width]`: the first stage of one dense gradient (name -> canonical `[P0, P1]`), float64."""
        raise NotImplementedError

    def mix(self, rows: torch.Tensor, segment: int) -> torch.Tensor:
        """`[n, dim]` = `M_s` applied to `first_stage(...)` rows."""
        return rows @ self.mixer(segment, rows.device, rows.dtype)

    def apply_dense(self, grads: Mapping[str, torch.Tensor], segment: int) -> torch.Tensor:
        """`R_s g` of one dense gradient (name -> canonical `[P0, P1]`): the reference the tests compare with."""
        return self.mix(self.first_stage_dense(grads).unsqueeze(0), segment)[0]

    def meta(self) -> dict[str, Any]:
        """What `projection_from_meta` needs to draw the same matrices again."""
        return {
            "kind": self.kind,
            "mix": self.mix_kind,
            "dim": self.dim,
            "seed": self.seed,
            "layers": self.describe(),
        }

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": n, "shape": list(s)} for n, s in self.params.items()]

    @staticmethod
    def _scaled(u: Use, scale, dtype, dev) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`(a, b)` of `F = a b^T` for one use, on its device (`P1 == 1`: `b` folded into `a`)."""
        if scale is None:
            return None, None
        a, b = scale[0].to(dev, dtype), scale[1].to(dev, dtype)
        return (a * b[0], None) if u.col is None else (a, b)


class TensorProjection(Projection):
    """First stage: one tensor sketch (Pham and Pagh 2013) of the whole gradient into `width` numbers.

    Entry `(i, j)` of parameter `p` is added, with sign `s0(i) s1(j)`, to bucket `(h0(i) + h1(j)) mod width`
    (random hashes per parameter): a count sketch of the flattened gradient, so inner products are unbiased
    with an error of about `|g| |h| / sqrt(width)`. For a per-sample gradient `sum_t row_t col_t^T` it is
    the circular convolution of the factors' own count sketches, `irfft(sum_t rfft(CS0 row_t) rfft(CS1
    col_t))`, computed without the gradient. Why offered: a per-parameter Kronecker block of side 32
    estimates a low-rank gradient's inner products only about as well as a 32-dimensional projection of
    each factor (relative error ~ sqrt(2 / 32)); the tensor sketch's first stage errs less at the same
    width (tests/test_sketch.py), and on the optimizer-aware demo it keeps far more of the ranking through
    the final mix (docs/benchmarks.md, "Session 9"). It costs about 4x the Kronecker stage per step."""

    kind = "tensor"

    def __init__(
        self,
        params: Mapping[str, tuple[int, int]],
        dim: int,
        seed: int,
        width: int = WIDTH,
        mix: str = "segment",
    ):
        super().__init__(params, dim, seed, mix)
        self.width = int(width)
        self._hashes: dict[tuple[str, torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def _key(self) -> list:
        return ["tensor", self.width]

    def hashes(self, name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """`(h0, s0, h1, s1)`: bucket and sign of each row and column of a parameter."""
        key = (name, device, dtype)
        if key not in self._hashes:
            p0, p1 = self.params[name]
            gen = self._generator(zlib.crc32(name.encode()))
            h0 = torch.randint(0, self.width, (p0,), generator=gen)
            s0 = torch.randint(0, 2, (p0,), generator=gen).to(torch.float64) * 2 - 1
            h1 = torch.randint(0, self.width, (p1,), generator=gen)
            s1 = torch.randint(0, 2, (p1,), generator=gen).to(torch.float64) * 2 - 1
            self._hashes[key] = (h0.to(device), s0.to(device, dtype), h1.to(device), s1.to(device, dtype))
        return self._hashes[key]

    def _count(self, x: torch.Tensor, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Count sketch of the last dimension of `x` (`[..., P]` -> `[..., width]`)."""
        out = torch.zeros(*x.shape[:-1], self.width, dtype=x.dtype, device=x.device)
        return out.index_add_(-1, h, x * s)

    def _spectrum(self, name: str, u: Use, scale) -> torch.Tensor:
        """`[n, width // 2 + 1]`: rfft of the tensor sketch of each sample's gradient of one use."""
        dtype = factor_dtype([u])
        dev = u.row.device
        h0, s0, h1, s1 = self.hashes(name, dev, dtype)
        a, b = self._scaled(u, scale, dtype, dev)
        if u.row_index:  # one-hot rows: the count sketch has one entry per token
            sign = s0[u.row] if a is None else s0[u.row] * a[u.row]
            rows = torch.zeros(*u.row.shape, self.width, dtype=dtype, device=dev)
            rows.scatter_(-1, h0[u.row].unsqueeze(-1), sign.unsqueeze(-1))
        else:
            rows = self._count(u.row.to(dtype) if a is None else u.row.to(dtype) * a, h0, s0)
        if u.col is None:  # P1 == 1: the column is the number 1 (times b, folded into a)
            one = torch.zeros(self.width, dtype=dtype, device=dev)
            one[h1[0]] = s1[0]
            return torch.fft.rfft(rows.sum(1)) * torch.fft.rfft(one)
        cols = self._count(u.col.to(dtype) if b is None else u.col.to(dtype) * b, h1, s1)
        return (torch.fft.rfft(rows) * torch.fft.rfft(cols)).sum(1)

    def first_stage(self, cap, names, scales=None) -> torch.Tensor:
        spectrum = None
        for pid, uses in cap.uses.items():
            name = names[pid]
            for u in uses:
                part = self._spectrum(name, u, None if scales is None else scales[name])
                spectrum = part if spectrum is None else spectrum.add_(part)
        return torch.fft.irfft(spectrum, n=self.width)

    def first_stage_dense(self, grads) -> torch.Tensor:
        out = torch.zeros(self.width, dtype=torch.float64)
        for name in self.params:
            g = grads[name].to(torch.float64)
            h0, s0, h1, s1 = self.hashes(name, g.device, torch.float64)
            bucket = (h0.unsqueeze(1) + h1.unsqueeze(0)) % self.width
            out = out.to(g.device).index_add_(0, bucket.reshape(-1), (g * torch.outer(s0, s1)).reshape(-1))
        return out

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "width": self.width}


class KroneckerProjection(Projection):
    """First stage of runs made before the tensor sketch, and of `--sketch-kind kronecker`: per parameter,
    Gaussian row and column projections `R0`, `R1` (a side of at most `side` is kept exact) of the captured
    token factors, so the per-sample gradient `sum_t row_t col_t^T` becomes `sum_t (R0 row_t)(R1 col_t)^T`;
    the parameters' small blocks are concatenated."""

    kind = "kronecker"

    def __init__(
        self,
        params: Mapping[str, tuple[int, int]],
        dim: int,
        seed: int,
        side: int = SIDE,
        mix: str = "segment",
    ):
        super().__init__(params, dim, seed, mix)
        self.side = int(side)
        self.blocks = {name: (min(p0, side), min(p1, side)) for name, (p0, p1) in self.params.items()}
        self.width = sum(a * b for a, b in self.blocks.values())
        self._factors: dict[tuple[str, torch.device, torch.dtype], tuple[Any, Any]] = {}

    def _key(self) -> list:
        return [self.side]

    def factors(self, name: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
        """`(R0, R1)` of a parameter (`None` = that side is kept exact)."""
        key = (name, device, dtype)
        if key not in self._factors:
            (p0, p1), tag = self.params[name], zlib.crc32(name.encode())
            r0 = self._gaussian(self.side, p0, tag, 0).to(device, dtype) if p0 > self.side else None
            r1 = self._gaussian(self.side, p1, tag, 1).to(device, dtype) if p1 > self.side else None
            self._factors[key] = (r0, r1)
        return self._factors[key]

    def _block(self, name: str, uses: list[Use], scale) -> torch.Tensor:
        dtype = factor_dtype(uses)
        dev = uses[0].row.device
        r0, r1 = self.factors(name, dev, dtype)
        p0 = self.params[name][0]
        small = []
        for u in uses:
            a, b = self._scaled(u, scale, dtype, dev)
            if u.row_index:
                row = r0.t()[u.row] if r0 is not None else torch.nn.functional.one_hot(u.row, p0).to(dtype)
                row = row if a is None else row * a[u.row].unsqueeze(-1)
            else:
                row = u.row.to(dtype) if a is None else u.row.to(dtype) * a
                row = row @ r0.t() if r0 is not None else row
            col = None
            if u.col is not None:
                col = u.col.to(dtype) if b is None else u.col.to(dtype) * b
                col = col @ r1.t() if r1 is not None else col
            small.append(Use(row, col, False))
        return materialize(small, self.blocks[name], True, dtype).reshape(uses[0].n, -1)

    def first_stage(self, cap, names, scales=None) -> torch.Tensor:
        by_name = {names[pid]: uses for pid, uses in cap.uses.items()}
        first = next(iter(cap.uses.values()))
        dtype, dev = factor_dtype(first), first[0].row.device
        parts = []
        for name, (a, b) in self.blocks.items():
            uses = by_name.get(name)
            scale = None if scales is None else scales[name]
            parts.append(
                self._block(name, uses, scale) if uses else torch.zeros(cap.n, a * b, dtype=dtype, device=dev)
            )
        return torch.cat(parts, dim=1)

    def first_stage_dense(self, grads) -> torch.Tensor:
        parts = []
        for name in self.blocks:
            g = grads[name].to(torch.float64)
            r0, r1 = self.factors(name, g.device, torch.float64)
            g = g if r0 is None else r0 @ g
            g = g if r1 is None else g @ r1.t()
            parts.append(g.reshape(-1))
        return torch.cat(parts)

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "side": self.side}

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"name": n, "shape": list(self.params[n]), "block": list(self.blocks[n])} for n in self.blocks
        ]


def make_projection(
    params: Mapping[str, tuple[int, int]],
    dim: int,
    seed: int,
    kind: str = DEFAULT_KIND,
    *,
    side: int | None = None,
    width: int | None = None,
    mix: str = DEFAULT_MIX,
) -> Projection:
    """The projection of `kind` (`tensor` or `kronecker`), with its size (`width` or `side`) or the default."""
    if kind == "tensor":
        return TensorProjection(params, dim, seed, WIDTH if width is None else width, mix)
    if kind == "kronecker":
        return KroneckerProjection(params, dim, seed, SIDE if side is None else side, mix)
    raise ValueError(f"sketch kind {kind!r}: expected one of {', '.join(KINDS)}")


def projection_from_meta(meta: Mapping[str, Any]) -> Projection:
    """The projection a run's `sketch/meta.json` describes. Older runs wrote no `kind` (Kronecker) and no
    `mix` (a mix per segment)."""
    shapes = {x["name"]: tuple(x["shape"]) for x in meta["layers"]}
    return make_projection(
        shapes,
        int(meta["dim"]),
        int(meta["seed"]),
        meta.get("kind", "kronecker"),
        side=meta.get("side"),
        width=meta.get("width"),
        mix=meta.get("mix", "segment"),
    )


def model_params(model: torch.nn.Module) -> tuple[dict[str, tuple[int, int]], dict[int, str]]:
    """(name -> canonical shape, id(param) -> name) of the trainable parameters, tied ones once."""
    from attribution.engine.rules import canonical_shape, trainable_params

    params = trainable_params(model)
    return {name: canonical_shape(p) for name, p in params.values()}, {
        pid: name for pid, (name, _) in params.items()
    }


class InRunSketch:
    """Accumulates `lr * c * w_i * R_s g_i` per document while a run trains; writes the FAISS indexes.

    `attach(valued_step)` registers `observe` with the step, which calls it after clipping and before
    the values with the training capture the valuer holds at that moment: no extra backward. The loop then calls
    `add(step, batch_idx)` with the global batch (every rank, like the values).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        dim: int,
        seed: int,
        segs: list[tuple[int, int]],
        store_row_of_seq: np.ndarray,
        doc_ids: Sequence[str],
        info=None,
        side: int | None = None,
        preconditioner: str | None = None,
        kind: str = DEFAULT_KIND,
        width: int | None = None,
        mix: str = DEFAULT_MIX,
    ):
        shapes, self.names = model_params(model)
        self.projection = make_projection(shapes, dim, seed, kind, side=side, width=width, mix=mix)
        self.segs = segs
        self.store_row_of_seq = np.asarray(store_row_of_seq, dtype=np.int64)
        self.doc_ids = [str(d) for d in doc_ids]
        self.acc = np.zeros((len(self.doc_ids), int(dim)), dtype=np.float64)
        self.info = info
        self.world = 1 if info is None else info.world
        self._pending: torch.Tensor | None = None  # the step's weighted first-stage rows, until add()
        self.preconditioner = preconditioner  # BALANCED: steps are weighted with Adam's K (optimizer-aware)

    # -- feeding ------------------------------------------------------------------------------
    def attach(self, step) -> None:
        """Observe a `ValuedStep`: each step's training capture is sketched before the valuer consumes it."""
        step.observers.append(self.observe)

    def observe(self, cap: Captured, step_size: float, pre: Mapping[int, torch.Tensor] | None = None) -> None:
        """Weight each sequence as its value is weighted: `lr * c * w_i / world` (`w_i` = 1/n for the mean),
        and, for optimizer-aware values, by the document side `balance(K_t)` of the step's Adam `K_t`."""
        scales = None
        if pre is not None:
            self.preconditioner = BALANCED
            scales = {
                self.names[pid]: balance(k.reshape(self.projection.params[self.names[pid]]))
                for pid, k in pre.items()
            }
        rows = self.projection.first_stage(cap, self.names, scales)
        w = cap.sample_weights().to(rows.device, rows.dtype) * (step_size / self.world)
        self._pending = rows * w.view(-1, 1)

    def add(self, step: int, batch_idx: np.ndarray) -> None:
        """Mix the pending rows with the step's segment and add them to their documents (global batch)."""
        from attribution.train import distributed as dist_util

        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError(f"sketch: step {step} was not observed (the valuer's values() never ran)")
        rows = self.project_rows(pending, step)
        if self.info is not None:
            rows = dist_util.gather_rows(self.info, rows)
        self.accumulate(rows, np.asarray(batch_idx, dtype=np.int64))

    def project_rows(self, rows: torch.Tensor, step: int) -> np.ndarray:
        return self.projection.mix(rows, segment_of(self.segs, step)).double().cpu().numpy()

    def accumulate(self, rows: np.ndarray, seqs: np.ndarray) -> None:
        docs = self.store_row_of_seq[seqs]
        keep = docs >= 0
        np.add.at(self.acc, docs[keep], rows[keep])

    # -- checkpoints --------------------------------------------------------------------------
    def _projection_key(self) -> np.ndarray:
        """The projection's description as bytes: a resumed run must keep adding with the same matrices."""
        meta = {k: v for k, v in self.projection.meta().items() if k != "layers"}
        return np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"sketch.acc": self.acc, "sketch.projection": self._projection_key()}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> bool:
        """Restore the accumulator; False when the checkpoint has none (made without a sketch) or one made
        with another projection (another kind, mix, width, side, dimension or seed, or code from before
        the projection was recorded): adding new steps to it would mix two projections."""
        saved, key = arrays.get("sketch.acc"), arrays.get("sketch.projection")
        if saved is None or np.asarray(saved).shape != self.acc.shape:
            return False
        if key is None or not np.array_equal(np.asarray(key, dtype=np.uint8), self._projection_key()):
            return False
        self.acc = np.asarray(saved, dtype=np.float64).copy()
        return True

    # -- output -------------------------------------------------------------------------------
    def write(self, out: str | Path) -> Path:
        """`sketch/index.faiss` (raw vectors), `index_unit.faiss` (unit-normalized) and `meta.json`.

        Only trained documents are indexed (a document no step used has no vector and no value)."""
        folder = Path(out) / SKETCH_DIR
        norms = np.linalg.norm(self.acc, axis=1)
        trained = np.flatnonzero(norms > 0)
        scales = {
            "raw": write_index(folder / INDEX, self.acc[trained]),
            "unit": write_index(folder / UNIT_INDEX, self.acc[trained] / norms[trained, None]),
        }
        meta = {
            **self.projection.meta(),
            "segments": [list(s) for s in self.segs],
            "doc_ids": [self.doc_ids[i] for i in trained],
            "files": {"raw": INDEX, "unit": UNIT_INDEX},
            "storage": STORAGE,
            "scale": scales,
            "weighting": "lr * clip factor * loss weight per sequence"
            + (
                " * F_t = balance(K_t), the rank-1 fit of sqrt|K_t| of the step's Adam K; claims take K / F"
                if self.preconditioner == BALANCED
                else " (the SGD formula)"
            ),
            "preconditioner": self.preconditioner,
            "projection": f"per segment s: M_s ({self.projection.kind} first stage); M_s Gaussian N(0, 1/dim)",
        }
        with atomic_write(folder / META) as fh:
            json.dump(meta, fh)
        return folder


def prefix(vectors: np.ndarray, dim: int) -> np.ndarray:
    """The `[n, dim]` vectors a run with `--sketch-dim dim` writes, from a larger-dimension run's `vectors`.

    Why: fidelity against the dimension needs one training run, not one per dimension. `M_s` of
    dimension K is the first K rows of the same seed's dimension-D draw rescaled by sqrt(D / K) (one
    generator fills `[dim, width]` row by row, entries divided by sqrt(dim)), and sketches are linear in
    `M_s`; tests/test_sketch.py checks the identity."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if not 0 < dim <= vectors.shape[1]:
        raise ValueError(f"prefix dimension {dim} must be in 1..{vectors.shape[1]}")
    return vectors[:, :dim] * np.sqrt(vectors.shape[1] / dim)


def make_index(vectors: np.ndarray):
    """An exhaustive inner-product index of `vectors` stored as float16, and the scale it was divided by.

    Why float16: a single-claim search over 1M documents reads every vector, so it is bound by memory
    traffic; half the bytes is about 3x faster than float32 (19 against 57 ms at dim 256,
    docs/benchmarks.md), and the search stays exhaustive. Sketch entries are products of learning
    rates and gradients (1e-8 and below is common), under float16's range, so the vectors are stored
    divided by their largest magnitude: scores are `scale x` the index's inner products.
    """
    import faiss

    vectors = np.asarray(vectors, dtype=np.float64)
    top = float(np.abs(vectors).max()) if vectors.size else 0.0
    scale = top if top > 0 else 1.0
    index = faiss.IndexScalarQuantizer(
        vectors.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )
    index.add(np.ascontiguousarray(vectors / scale, dtype=np.float32))
    return index, scale


def write_index(path: Path, vectors: np.ndarray) -> float:
    """`make_index(vectors)`, written atomically; returns the scale (the meta records it)."""
    import faiss

    index, scale = make_index(vectors)
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    return scale


@dataclass
class SketchIndex:
    """A run's sketch as `claim --fast` reads it."""

    folder: Path
    meta: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def segments(self) -> list[tuple[int, int]]:
        return [(int(a), int(b)) for a, b in self.meta["segments"]]

    def projection(self) -> Projection:
        return projection_from_meta(self.meta)

    def scale(self, kind: str = "raw") -> float:
        """What the index's inner products are multiplied by (1 for the float32 indexes of older runs)."""
        return float(self.meta.get("scale", {}).get(kind, 1.0))

    def vectors(self, kind: str = "raw") -> np.ndarray:
        """`[n_docs, dim]` float64 document vectors, at their true scale."""
        whole = self.vector_blocks(kind, len(self.meta["doc_ids"]))
        return next(whole, (0, np.empty((0, self.dim))))[1]

    def vector_blocks(self, kind: str = "raw", rows: int = 1 << 16) -> Iterator[tuple[int, np.ndarray]]:
        """`(start, [count, dim])`: the document vectors from `start` on, `rows` at a time, float64 at their
        true scale, so that a large corpus need not be held whole in float64."""
        index, scale = self.load(kind), self.scale(kind)
        for start in range(0, index.ntotal, max(1, rows)):
            count = min(rows, index.ntotal - start)
            yield start, index.reconstruct_n(start, count).astype(np.float64) * scale

    def load(self, kind: str = "raw"):
        """The FAISS index (`raw` or `unit`); its dimension must be the run's. Scores: times `scale(kind)`."""
        import faiss

        path = self.folder / self.meta["files"][kind]
        if not path.is_file():
            raise UserError(f"{path}: sketch index file is missing")
        index = faiss.read_index(str(path))
        if index.d != self.dim or index.ntotal != len(self.meta["doc_ids"]):
            raise UserError(
                f"{path}: index holds {index.ntotal} vectors of dimension {index.d}, but the run's sketch "
                f"meta says {len(self.meta['doc_ids'])} of dimension {self.dim}; rebuild the run's sketch"
            )
        return index


def describe(run: str | Path) -> dict[str, Any] | None:
    """The manifest's description of a run's in-run sketch index, or None when it has none."""
    keys = ("dim", "kind", "mix", "width", "seed", "storage", "weighting", "preconditioner")
    return describe_index(
        Path(run) / SKETCH_DIR,
        keys,
        "the in-run views (value, cosine, contrast, standout, standout_cosine, ...)",
    )


def describe_index(folder: Path, keys: Sequence[str], views: str) -> dict[str, Any] | None:
    """An index folder's `meta.json` as the manifest describes it: these keys, its files, how many
    documents, which views it ranks by; None when the folder has no index."""
    path = folder / META
    if not path.is_file():
        return None
    meta = json.loads(path.read_text(encoding="utf-8"))
    return {k: meta[k] for k in keys if k in meta} | {
        "files": [f"{folder.name}/{f}" for f in meta["files"].values()],
        "documents": len(meta["doc_ids"]),
        "views": views,
    }


def read_sketch(run: str | Path, config: Mapping[str, Any] | None = None) -> SketchIndex:
    """The run's sketch index; one clear line when there is none or it does not match the run."""
    folder = Path(run) / SKETCH_DIR
    if not (folder / META).is_file() or not (folder / INDEX).is_file():
        raise UserError(
            f"{run}: this run has no sketch index ({SKETCH_DIR}/{INDEX}); it was trained with "
            "--no-sketch, without values, or before sketches existed: use `attribution claim` without "
            "--fast (exact replay)"
        )
    return SketchIndex(folder, read_meta(folder / META, config))


def read_meta(path: Path, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An index's `meta.json`, whose dimension must be the run's `--sketch-dim` (one clear line if not)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    want = (config or {}).get("sketch_dim")
    if want is not None and int(want) != int(meta.get("dim", -1)):
        raise UserError(
            f"{path}: sketch dimension {meta.get('dim')} differs from the run's --sketch-dim "
            f"{want}: the index is not this run's"
        )
    return meta
