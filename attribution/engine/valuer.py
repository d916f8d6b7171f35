"""In-training-loop valuation: one training step with hooks gives the optimizer's gradients and values.

Usage (the training loop, one micro-batch per optimizer step)::

    valuer = Valuer(model, {"math": ValSet(ids, mask, names)}, order=2, optimizer_aware=True)
    loss = valuer.forward_backward(ids, mask)      # .grad exactly as plain loss.backward()
    clip = clip_grad_norm_(...)  ->  factor = min(1, max_norm / total_norm)
    sv = valuer.values(lr, grad_scale=factor, optimizer=opt)   # order 1: this step's values
    opt.step()
    sv = sv or valuer.after_step()                  # order 2: the step's finished values
    ...
    sv = valuer.finish()                            # flush (None if nothing pending)

First order costs the plain training step, one validation forward/backward per validation set
(never touching `.grad`) and the scoring. Second order uses the trapezoid rule along the step,
`phi = lr_eff <g_z, (g_val(w) + g_val(w'))/2>`, which equals the paper's second-order term up to
O(lr^3); the validation gradient at `w'` is computed once in `after_step()` and reused as the next
step's "before" gradient, so second order needs no second backward pass either.

Gradient accumulation and weighted losses: `forward_backward(ids, mask, weights=w, accumulate=True)`
backpropagates `sum_i w_i loss_i` and joins this micro-batch's captures to the step's earlier ones;
`values()` then scores every sequence of the optimizer step, each with `lr * c * w_i` instead of
`lr * c / n` (the mean is `w_i = 1/n`). The plan is made in `values()` for accumulated steps.

DDP: pass the DDP-wrapped model. `forward_backward` runs the wrapped model (so DDP all-reduces
`.grad` as usual); the validation passes run the inner module (`model.module`) with
`torch.autograd.grad`, which DDP never sees. Each rank values its own shard; the per-example step
is `lr / (n_local * world_size)`, matching DDP's gradient averaging.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from attribution.errors import UserError

from .capture import Captured, Capturer, join_captures
from .ghost import self_sq_norms
from .optimizer import adam_preconditioner, is_adam
from .planner import Plan, choose, resolve_forced
from .rules import Use, canonical_shape
from .scoring import ValSide, build_val_side, compute_dtype, materialize, score_sets, sq_norms
from .task import LanguageModelingTask, Task

# one validation chunk's [seqs, T, V] float32 tensor: 128 MiB, 10 sequences of 64 tokens at GPT-2's vocabulary.
# Chosen on the twelve-text shape (docs/benchmarks.md, "Session 19"): 64 MiB made the head's GEMMs too short
# (validation side 0.80 -> 0.63 s); 256 MiB took its run's peak RSS past the memory budget (3.06 GB).
VAL_CHUNK_BYTES = 1 << 27


def sequences_per_pass(seq_len: int, widest: int) -> int:
    """Sequences per gradient-only forward/backward: as many as keep one `[seqs, T, widest]` float32
    tensor (the logits, their gradient, the head's captured factor) under `VAL_CHUNK_BYTES`. Why: those
    tensors are the largest of such a pass; the gradients add up, so the chunking changes no value beyond
    rounding."""
    return max(1, VAL_CHUNK_BYTES // (seq_len * widest * 4))


class ValSet:
    """A validation set: token ids `[n, T]`, mask `[n, T]` (1 = real token) and one name per example.

    An example is one sequence, unless `groups` says which example each sequence belongs to (a document
    longer than the context is several sequences): `groups` `[n]` holds each sequence's example index in
    `0..len(names)-1`, and per-example values are then one column per example, the value against the
    sum of its sequences' losses. `names` (alias `ids_names`) label the columns; default "0", "1", ...
    """

    def __init__(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        names: list[str] | None = None,
        *,
        ids_names: list[str] | None = None,
        groups: torch.Tensor | np.ndarray | list[int] | None = None,
    ):
        ids = torch.as_tensor(ids)
        if ids.dim() != 2 or ids.shape[0] == 0:
            raise UserError(f"validation ids must be a non-empty [n, T] array, got shape {tuple(ids.shape)}")
        self.ids = ids.long()
        self.mask = torch.ones_like(self.ids) if mask is None else torch.as_tensor(mask).long()
        if self.mask.shape != self.ids.shape:
            raise UserError(
                f"validation mask shape {tuple(self.mask.shape)} != ids shape {tuple(self.ids.shape)}"
            )
        names = names if names is not None else ids_names
        self.groups = None if groups is None else torch.as_tensor(np.asarray(groups), dtype=torch.long)
        if self.groups is not None:
            if self.groups.shape != (len(self.ids),):
                raise UserError(f"{self.groups.numel()} validation groups for {len(self.ids)} sequences")
            if int(self.groups.min()) < 0:
                raise UserError("validation groups must be example indices >= 0")
        n_columns = len(self.ids) if self.groups is None else int(self.groups.max()) + 1
        self.names = [str(i) for i in range(n_columns)] if names is None else [str(x) for x in names]
        if self.groups is not None and int(self.groups.max()) >= len(self.names):
            raise UserError(
                f"validation group {int(self.groups.max())} has no name ({len(self.names)} names)"
            )
        if self.groups is None and len(self.names) != len(self.ids):
            raise UserError(f"{len(self.names)} validation names for {len(self.ids)} sequences")

    def trimmed(self) -> ValSet:
        """The same set without its trailing columns that are padding in every sequence.

        Why: the loop pads every validation text to the training length (a 64-token claim becomes a
        128-token row), and the validation pass and the ghost Gram products cost per column. For a causal
        task (`LanguageModelingTask.causal`) those columns change no real position's loss or gradient."""
        real = torch.nonzero(self.mask.any(0))
        t = int(real.max()) + 1 if len(real) else self.ids.shape[1]
        if t == self.ids.shape[1]:
            return self
        out = copy.copy(self)
        out.ids, out.mask = self.ids[:, :t].contiguous(), self.mask[:, :t].contiguous()
        return out

    def longest_first(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequences' order longest first (stable) and each one's real length (last real token + 1).

        Why: a validation pass costs per position of its chunk, padding included (the head's GEMMs and
        a softmax over the vocabulary at each). A text's last sequence is mostly padding; taken longest
        first, the short ones share chunks, which a causal task trims to their own longest
        (`Valuer._pass_spans`). Stable, so a text's full sequences stay next to each other: still one GEMM
        per text (`ByColumn`)."""
        positions = torch.arange(1, self.mask.shape[1] + 1, device=self.mask.device)
        length = ((self.mask != 0) * positions).amax(1)
        return torch.sort(length, descending=True, stable=True).indices, length

    @property
    def ids_names(self) -> list[str]:
        return self.names

    @property
    def n_columns(self) -> int:
        """Per-example columns: examples (the names), which are sequences unless grouped."""
        return len(self.names)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class StepValues:
    """One step's values. Positive = the training sequence lowered that validation loss."""

    step: int
    per_set: dict[str, np.ndarray]  # float64 [n_train]
    per_example: dict[str, np.ndarray]  # float64 [n_train, n_val]
    val_loss: dict[str, float]  # summed validation loss at the weights the values used (before the step)
    train_grad_sq_norm: np.ndarray | None = None  # [n_train] ||grad loss_i||^2 (when grad_norms=True)
    val_grad_sq_norm: dict[str, float] = field(
        default_factory=dict
    )  # ||grad L_val||^2 (when grad_norms=True)
    # per-example sets, grad_norms=True: [n_val] ||grad loss_j||^2 of each validation example (the sum of its
    # sequences' losses), at the weights before the step
    val_example_sq_norm: dict[str, np.ndarray] = field(default_factory=dict)
    lr: float = 0.0
    grad_scale: float = 1.0
    order: int = 1
    optimizer_aware: bool = False


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for validation gradients, then every module's own training flag restored."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _world_size(model: nn.Module) -> int:
    if isinstance(model, nn.parallel.DistributedDataParallel) and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _processes() -> int:
    """Ranks that share one optimizer step: the global batch is this many local batches. Unlike
    `_world_size`, also when the loop averages gradients itself (`attribution.train.distributed`) and
    the model is not wrapped in DDP: Adam's path rule depends on the global batch size."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def side_sq_norm(side: ValSide, shapes: dict[int, tuple[int, int]]) -> float:
    """`||g_val||^2` of the whole set (per-example sides are summed first).

    A ghost parameter's part is the cheaper of two exact routes: its gradient summed into one dense
    matrix (tokens x P0 x P1), or the ghost self-product of all the set's tokens as one sample
    (tokens^2 x (P0 + P1), `ghost_norm_is_cheaper`): for GPT-2 small's tied head and 256 validation
    tokens the second is 6x cheaper; for thousands of tokens the first.
    """
    # a device scalar until the end: one synchronization, not one per parameter
    total: float | torch.Tensor = 0.0
    for g in side.dense.values():
        total = total + (g.sum(0).double() ** 2).sum()
    entries: dict[int, list[tuple[list[Use], float]]] = {}
    for cap, w in side.ghost:
        for pid, uses in cap.uses.items():
            entries.setdefault(pid, []).append((uses, w))
    for pid, parts in entries.items():
        uses, w = parts[0]
        dtype = compute_dtype(uses[0].col if uses[0].col is not None else uses[0].row)
        tokens = uses[0].row.shape[0] * uses[0].row.shape[1]  # every use of a parameter sees the same tokens
        if len(parts) == 1 and ghost_norm_is_cheaper(tokens, shapes[pid]):
            flat = [_one_sample(u) for u in uses]
            total = total + (w * w) * self_sq_norms(flat, dtype)[0].double()
            continue
        g = sum(weight * materialize(part, shapes[pid], False, dtype)[0].double() for part, weight in parts)
        total = total + (g**2).sum()
    return float(total)


def ghost_norm_is_cheaper(tokens: int, shape: tuple[int, int]) -> bool:
    """`tokens^2 (P0 + P1) < tokens P0 P1`: the ghost self-product of `tokens` beats materializing."""
    return tokens * (shape[0] + shape[1]) < shape[0] * shape[1]


def _one_sample(u: Use) -> Use:
    """The use with all its samples' tokens as one sample: its self-norm is that of the summed gradient."""
    row = u.row.reshape(1, -1) if u.row_index else u.row.reshape(1, -1, u.row.shape[-1])
    col = None if u.col is None else u.col.reshape(1, -1, u.col.shape[-1])
    return Use(row, col, u.row_index)


def column_sq_norms(side: ValSide) -> torch.Tensor:
    """`[groups]` float64 `||g||^2` of each per-example column's validation gradient (one sequence's, or
    the sum of a grouped example's sequences'), read from the side as built (before preconditioning).

    Dense parameters: the rows themselves (a dot product per row; for the tied head far cheaper than the
    ghost self-product of the factors). Ghost parameters: the ghost self-norm of each column's tokens
    taken as one sample, cross terms between its sequences included. Approximate strategies (kronecker)
    give the norm in their own sketched space, as their values are."""
    device = next(iter(side.dense.values())).device if side.dense else None
    total: torch.Tensor | None = None

    def add(part: torch.Tensor) -> None:
        nonlocal total
        part = part.double()
        total = part if total is None else total + part.to(total.device)

    for g in side.dense.values():
        flat = g.reshape(len(g), 1, -1)
        add(torch.bmm(flat, flat.transpose(1, 2)).view(-1))
    alone = side.columns is not None and side.columns.unique().numel() == side.m  # a column per sequence
    for cap, w in side.ghost:
        for uses in cap.uses.values():
            dtype = compute_dtype(uses[0].col if uses[0].col is not None else uses[0].row)
            if side.columns is None:
                add((w * w) * self_sq_norms(uses, dtype))
                continue
            cols = side.columns.to(uses[0].row.device)
            if alone:  # each sequence's own norm, in its column's place (the pass takes them out of order)
                norms = self_sq_norms(uses, dtype).double()
                add((w * w) * norms.new_zeros(side.groups).index_add_(0, cols, norms))
                continue
            per_column = [
                [_one_sample(u.samples(torch.nonzero(cols == c).view(-1))) for u in uses]
                for c in range(side.groups)
            ]
            add((w * w) * torch.stack([self_sq_norms(column, dtype)[0] for column in per_column]))
    if total is None:
        return torch.zeros(side.groups, dtype=torch.float64, device=device)
    return total


class Valuer:
    """Values every training sequence of every step against fixed validation sets (see module doc)."""

    def __init__(
        self,
        model: nn.Module,
        val_sets: Mapping[str, ValSet],
        *,
        order: int = 1,
        per_example: Collection[str] = (),
        optimizer_aware: bool = False,
        strategy: str | dict[str, str] | None = None,
        task: Task | None = None,
        grad_norms: bool = False,
        autocast_dtype: torch.dtype | None = None,
        second_moment: bool = True,
        val_chunk: int | None = None,
    ):
        if order not in (1, 2):
            raise UserError(f"order must be 1 or 2, got {order}")
        unknown = set(per_example) - set(val_sets)
        if unknown:
            raise UserError(f"per_example names unknown validation sets: {sorted(unknown)}")
        if not val_sets:
            raise UserError("at least one validation set is needed")
        self.model = model
        self.inner = _unwrap(model)
        self.task = task or LanguageModelingTask()
        # a causal task's trailing all-padding columns change nothing: the validation passes skip them
        trim = getattr(self.task, "causal", False)
        self.val_sets = {k: v.trimmed() if trim else v for k, v in val_sets.items()}
        # and each pass takes a chunk of sequences of like length, trimmed to its longest (ValSet.longest_first)
        self._pass_order = {k: v.longest_first() for k, v in self.val_sets.items()} if trim else {}
        self.order = order
        self.per_example = set(per_example)
        self.optimizer_aware = optimizer_aware
        self.strategy = strategy
        self.grad_norms = grad_norms
        self.autocast_dtype = autocast_dtype
        self.second_moment = second_moment
        self.val_chunk = val_chunk  # validation sequences per forward/backward; None = by VAL_CHUNK_BYTES
        self.capturer = Capturer(self.inner)
        self.shapes = {pid: canonical_shape(p) for pid, (_, p) in self.capturer.params.items()}
        self.names = {pid: name for pid, (name, _) in self.capturer.params.items()}
        self.step = 0
        self._pre: tuple[int, dict[int, torch.Tensor]] | None = None  # (step, K) of preconditioner()
        self._train: Captured | None = None
        self._plans: dict[str, Plan] = {}
        self._plan_key: tuple | None = None
        self._cache: dict[str, tuple[int, ValSide, float]] = {}  # name -> (weights version, side, loss)
        self._val_norms: dict[str, np.ndarray] = {}  # per-example set -> ||g_val_j||^2 at the cached weights
        self._spare: dict[tuple[str, int], torch.Tensor] = {}  # a dead side's buffers, for the next side
        self._pending: dict | None = None

    # -- plumbing -------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(self.inner.parameters()).device

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self._device().type, dtype=self.autocast_dtype)

    def _version(self) -> int:
        """Changes whenever any parameter is modified in place (optimizer steps, loads)."""
        return sum(p._version for _, p in self.capturer.params.values())

    @property
    def train_capture(self) -> Captured | None:
        """This step's training capture, from `forward_backward` until `values()` consumes it."""
        return self._train

    def plans(self) -> dict[str, Plan]:
        """The current per-validation-set plans (after the first `forward_backward`)."""
        return self._plans

    def _plan(self, train: Captured) -> None:
        t_tokens = train.tokens
        key = (train.n, t_tokens)
        if key == self._plan_key:
            return
        self._plan_key = key
        self._cache.clear()
        for name, vs in self.val_sets.items():
            pe = name in self.per_example
            sizes = {
                "n": train.n,
                "train_tokens": t_tokens,
                "m": len(vs),
                "val_tokens": self._pass_positions(name),
                "groups": vs.n_columns if pe else 1,
            }
            plan = Plan(sizes=sizes)
            for pid, uses in train.uses.items():
                pname = self.names[pid]
                plan.layers[pid] = choose(
                    pname,
                    self.shapes[pid],
                    uses,
                    sizes,
                    optimizer_aware=self.optimizer_aware,
                    forced=resolve_forced(pname, self.strategy),
                )
            self._plans[name] = plan

    def _val_chunk(self, vs: ValSet) -> int:
        """Sequences per validation forward/backward: `val_chunk`, or `sequences_per_pass`."""
        if self.val_chunk is not None:
            return self.val_chunk
        return sequences_per_pass(vs.ids.shape[1], max(p0 for p0, _ in self.shapes.values()))

    def _pass_spans(self, name: str) -> Iterator[tuple[torch.Tensor, int | None]]:
        """The validation pass's chunks of one set: each chunk's sequences (indices into the set) and the
        width it is cut to (None: the set's). In `_val_chunk` sequences at a time; for a causal task
        longest first, each chunk cut to its longest (`ValSet.longest_first`)."""
        vs = self.val_sets[name]
        order, length = self._pass_order.get(name, (torch.arange(len(vs), device=vs.ids.device), None))
        for seqs in order.split(self._val_chunk(vs)):
            # a causal task: the chunk's trailing padding changes no loss or gradient
            yield seqs, None if length is None else max(1, int(length[seqs].max()))

    def _pass_positions(self, name: str) -> int:
        """Token positions the validation pass over one set computes, padding to each chunk's width included."""
        width = self.val_sets[name].ids.shape[1]
        return sum(len(seqs) * (width if t is None else t) for seqs, t in self._pass_spans(name))

    def pass_chunks(self, name: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The validation pass over one set, chunk by chunk (`_pass_spans`): `(seqs, ids, mask)`, the
        chunk's sequences (indices into the set) and their tokens on the valuer's device."""
        vs, dev = self.val_sets[name], self._device()
        for seqs, t in self._pass_spans(name):
            ids, mask = vs.ids[seqs], vs.mask[seqs]
            if t is not None:
                ids, mask = ids[:, :t].contiguous(), mask[:, :t].contiguous()
            yield seqs.to(dev), ids.to(dev), mask.to(dev)

    def _val_side(self, name: str) -> tuple[ValSide, float]:
        """The set's side at the current weights (cached per weights version), its summed loss.

        Why in chunks of sequences: a set's `[seqs, T, V]` logits and head factors are the largest
        temporaries of the step (several GB for 64 sequences of 64 tokens); the side itself is linear, so
        the chunks' per-example gradients are placed side by side and whole-set gradients are summed."""
        version = self._version()
        hit = self._cache.pop(name, None)  # a stale side is freed before the new one is built
        if hit is not None and hit[0] == version:
            self._cache[name] = hit
            return hit[1], hit[2]
        if hit is not None and self.order == 1:  # (at order 2 the stale side is the pending "before")
            self._recycle(name, hit[1])
        vs, plan, pe = self.val_sets[name], self._plans[name], name in self.per_example
        dev = self._device()
        columns = vs.groups.to(dev) if pe and vs.groups is not None else None
        rows = vs.n_columns if pe else 1
        dense: dict[int, torch.Tensor] = {}
        kept: Captured | None = None  # factors of the strategies that score from them (ghost)
        losses, taken = [], []  # taken: the sequences in the order the pass captured them

        def buffer(pid: int, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
            if pid not in dense:  # room for every column's gradient, which each chunk adds into
                dense[pid] = self._buffer(name, pid, (rows, *shape), dtype)
            return dense[pid]

        for seqs, ids, mask in self.pass_chunks(name):
            with eval_mode(self.inner), torch.enable_grad(), self._autocast():
                cap = self.capturer.grads_only(
                    lambda ids=ids, mask=mask: self.task.per_sequence_loss(self.inner, ids, mask)
                )
            taken.append(seqs)
            index = None  # per example: each sequence's column (its example's row of the side)
            if pe:
                index = columns[seqs] if columns is not None else seqs
            part = build_val_side(cap, plan, self.shapes, pe, index, buffer)
            losses.append(cap.losses)
            del cap
            for pid, g in part.dense.items():
                if pid not in dense:
                    dense[pid] = g
                elif dense[pid] is not g:  # a whole-set gradient: the chunks' gradients add up
                    dense[pid].add_(g)
            for c, _ in part.ghost:
                kept = c if kept is None else join_captures(kept, c)
        order = torch.cat(taken)
        side = ValSide(
            len(vs),
            pe,
            [(kept, 1.0)] if kept is not None else [],
            dense,
            # the kept captures' sequences are in pass order: each one's column
            columns=(columns[order] if columns is not None else order) if pe else None,
            n_columns=rows if pe else 0,
        )
        if self.grad_norms and pe:  # before anything preconditions or combines the side in place
            self._val_norms[name] = column_sq_norms(side).cpu().numpy()
        loss = float(torch.cat(losses).double().sum())
        self._cache[name] = (version, side, loss)
        return side, loss

    def _buffer(self, name: str, pid: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Zeros of `shape` for a per-example side, in a dead side's buffer where one fits.

        Why: a per-example side of the tied head is the step's largest tensor (811 MB for 64 sequences
        at d = 64). Allocated afresh every step, glibc's heap (mmap off, `attribution.memory`) may fill
        the hole it leaves with smaller temporaries and grow. Measured at the twelve-text shape the
        effect is small (engine peak 3.16 -> 3.13 GB, docs/benchmarks.md "Session 10"), but free."""
        buf = self._spare.pop((name, pid), None)
        device = self._device()
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            return torch.zeros(shape, dtype=dtype, device=device)
        return buf.zero_()

    def _recycle(self, name: str, side: ValSide) -> None:
        """Keep a side nothing holds any more (its per-example buffers) for `_buffer`."""
        if side.per_example:
            for pid, g in side.dense.items():
                self._spare[(name, pid)] = g

    def _finish_values(
        self,
        train: Captured,
        sides: dict[str, ValSide],
        losses: dict[str, float],
        lr: float,
        grad_scale: float,
        lr_eff: float | torch.Tensor,
        set_norms: dict[str, float],
        val_norms: dict[str, np.ndarray] | None = None,
    ) -> StepValues:
        sv = StepValues(
            self.step,
            {},
            {},
            losses,
            lr=lr,
            grad_scale=grad_scale,
            order=self.order,
            optimizer_aware=self.optimizer_aware,
        )
        scores = score_sets(train, sides, {name: self._plans[name] for name in sides}, self.shapes)
        for name, s in scores.items():
            s = s * lr_eff
            sv.per_set[name] = s.sum(1).numpy()
            if name in self.per_example:
                sv.per_example[name] = s.numpy()
        if self.grad_norms:
            sv.train_grad_sq_norm = sq_norms(train, self._plans[next(iter(self._plans))]).numpy()
            sv.val_grad_sq_norm = dict(set_norms)
            sv.val_example_sq_norm = dict(val_norms or {})
        return sv

    def _set_norms(self, sides: Mapping[str, ValSide]) -> dict[str, float]:
        """`||g_val||^2` per set (grad_norms), read before the sides are combined or preconditioned in place."""
        return {k: side_sq_norm(v, self.shapes) for k, v in sides.items()} if self.grad_norms else {}

    # -- the contract -----------------------------------------------------------------------------
    def forward_backward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        weights: torch.Tensor | None = None,
        accumulate: bool = False,
    ) -> float:
        """Train loss (mean of per-sequence losses); `.grad` exactly as plain `loss.backward()`.

        `weights` `[n]`: backpropagate `sum_i weights_i * loss_i` instead of the mean. `accumulate`:
        this micro-batch belongs to the same optimizer step as the previous ones (`.grad` adds up as
        torch's does; the captures are joined, so `values()` covers every sequence of the step).
        """
        if self._pending is not None:
            raise UserError(
                "order-2 valuer: call after_step() after optimizer.step() before the next forward_backward"
            )
        dev = self._device()
        ids = torch.as_tensor(ids).to(dev)
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).to(dev)
        with self._autocast():
            loss, cap = self.capturer.train(
                lambda: self.task.per_sequence_loss(self.model, ids, mask), weights
            )
        if accumulate and self._train is not None:
            self._train = join_captures(self._train, cap)
            return float(loss)
        self.step += 1
        self._train = cap
        if not accumulate:  # an accumulated step is planned once its size is known, in values()
            self._plan(cap)
        return float(loss)

    def values(
        self, lr: float, *, grad_scale: float = 1.0, optimizer: torch.optim.Optimizer | None = None
    ) -> StepValues | None:
        """After clipping, before `optimizer.step()`. Order 1: this step's values; order 2: None (see after_step).

        `grad_scale` is the clipping factor actually applied to `.grad`; `optimizer` (AdamW) is needed
        when the Valuer is optimizer-aware and is read, never changed.
        """
        if self._train is None:
            raise UserError("values() needs a forward_backward() first")
        train = self._train
        self._plan(train)  # a no-op unless the step was accumulated
        if self.optimizer_aware and optimizer is None:
            raise UserError("optimizer_aware=True: pass the optimizer to values()")
        pre = self.preconditioner(optimizer)
        train, self._train, self._pre = self._train, None, None
        if train.weights is None:
            lr_eff: float | torch.Tensor = lr * grad_scale / (train.n * _world_size(self.model))
        else:  # [n, 1]: each sequence's own share of the step
            lr_eff = (lr * grad_scale / _world_size(self.model)) * train.weights.view(-1, 1)
        sides, losses = {}, {}
        for name in self.val_sets:
            sides[name], losses[name] = self._val_side(name)
        val_norms = {k: self._val_norms[k] for k in self.per_example if k in self._val_norms}
        if self.order == 1:
            norms = self._set_norms(sides)
            if not pre:
                return self._finish_values(train, sides, losses, lr, grad_scale, lr_eff, norms, val_norms)
            # the optimizer step makes the cached sides stale: precondition them in place, then recycle
            self._cache.clear()
            sides = {k: s.precondition_(pre) for k, s in sides.items()}
            sv = self._finish_values(train, sides, losses, lr, grad_scale, lr_eff, norms, val_norms)
            for k, side in sides.items():
                self._recycle(k, side)
            return sv
        self._pending = {
            "train": train,
            "sides": sides,
            "losses": losses,
            "pre": pre,
            "lr": lr,
            "grad_scale": grad_scale,
            "lr_eff": lr_eff,
            "version": self._version(),
            "val_norms": val_norms,
        }
        return None

    def preconditioner(self, optimizer: torch.optim.Optimizer | None) -> dict[int, torch.Tensor] | None:
        """This step's Adam `K` (param id -> param-shaped), or None (SGD proxy, or not an Adam optimizer).

        Computed once per step and shared: `values()` scores with it and the in-run sketch weights each
        document's gradient with it (`attribution.train.sketch`), before `optimizer.step()` changes the state.
        """
        if not self.optimizer_aware or optimizer is None or not is_adam(optimizer) or self._train is None:
            return None
        if self._pre is None or self._pre[0] != self.step:
            params = {pid: p for pid, (_, p) in self.capturer.params.items()}
            k = adam_preconditioner(
                optimizer,
                params,
                second_moment=self.second_moment,
                batch_size=self._train.n * _processes(),
            )
            self._pre = (self.step, k)
        return self._pre[1]

    def after_step(self) -> StepValues | None:
        """After `optimizer.step()`. Order 2: the finished values of the step just taken; order 1: None."""
        if self.order == 1 or self._pending is None:
            return None
        p, self._pending = self._pending, None
        if self._version() == p["version"]:  # the weights did not move: trapezoid = first order
            after = p["sides"]
        else:
            after = {name: self._val_side(name)[0] for name in self.val_sets}
        norms = self._set_norms(p["sides"])
        scored = {}
        for name, before in p["sides"].items():
            # "before" is dead after this step (the cache now holds "after"): combine into it, unless it
            # *is* "after" (weights unchanged) and the cache still needs it
            side = (
                before.combine(before, 0.5, 0.5)
                if after[name] is before
                else before.combine_(after[name], 0.5, 0.5)
            )
            scored[name] = side.precondition_(p["pre"]) if p["pre"] else side
        sv = self._finish_values(
            p["train"], scored, p["losses"], p["lr"], p["grad_scale"], p["lr_eff"], norms, p["val_norms"]
        )
        for name, side in scored.items():
            if side is not after[name]:  # "before", combined in place (or a copy): nothing holds it now
                self._recycle(name, side)
        return sv

    def finish(self) -> StepValues | None:
        """Flush: a pending order-2 step whose optimizer step never happened is valued at first order."""
        if self._pending is None:
            return None
        p, self._pending = self._pending, None
        norms = self._set_norms(p["sides"])
        scored = {k: s.precondition(p["pre"]) if p["pre"] else s for k, s in p["sides"].items()}
        return self._finish_values(
            p["train"], scored, p["losses"], p["lr"], p["grad_scale"], p["lr_eff"], norms, p["val_norms"]
        )

    def close(self) -> None:
        """Remove the hooks."""
        self.capturer.remove()
