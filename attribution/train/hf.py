"""Value the data of an existing Hugging Face `Trainer` script with a few added lines.

A plain `TrainerCallback` cannot reach the backward pass (the engine must run the forward/backward
itself to record per-sequence activations and output gradients), so this is a `Trainer` subclass
plus an internal callback for the points the subclass cannot see (just before/after
`optimizer.step()`). The step itself is `attribution.train.step.ValuedStep`, the same object
`attribution run` uses; the Trainer only drives it::

    from attribution.train.hf import ValuedTrainer, valset_from_texts
    trainer = ValuedTrainer(model=model, args=args, train_dataset=ds,          # ds has a `doc_row` column
                            val_sets={"mine": valset_from_texts(texts, seq_len=128)},
                            docs=docs_frame, value_dir="runs/hf")               # doc_id, source, owner
    trainer.train()                                                           # -> runs/hf/doc_values.parquet ...

Supported:
- `gradient_accumulation_steps` > 1: the micro-batches of an optimizer step are valued together,
  exactly (accumulation 4 x batch 4 gives the values of batch 16); micro-batches may differ in
  length (HF's dynamic padding);
- several processes (torchrun, DDP; tested with gloo): each rank values its rows, the values of the
  global batch are gathered on rank 0, which writes `value_dir` (2 processes give the values of 1).
  The engine runs the unwrapped model and the ranks' gradients are averaged by hand, as in
  `attribution run`;
- two losses, `loss_mean=`:
  `"sequence"` (default): the mean over the step's sequences of each sequence's mean token loss
  (`LanguageModelingTask`), so every sequence weighs the same;
  `"token"`: HF's own causal-LM loss, the mean over *all* label tokens of the step (every micro-batch
  and rank). A sequence with `n_i` of the step's `N` label tokens then carries weight `n_i / N`, and
  its value is its share of that loss's gradient: `lr * c * (n_i / N) * <g_val, grad L_i>` at first
  order (`L_i` its mean token loss); the shares add up to the step's value, as with `"sequence"`.
- values are for the clipped step: the clip factor `min(1, max_grad_norm / (||g|| + 1e-6))` is
  computed from the (rank-averaged) gradient before the Trainer clips it, exactly as torch applies it.

Requirements: every training row needs `doc_row`, the row of its document in `docs` (a document cut
into several rows gets the sum of their values); `attention_mask` is optional (all ones). Not
supported: DeepSpeed/FSDP (the engine needs whole parameters) and gradient checkpointing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import Trainer, TrainerCallback

from attribution.engine.valuer import ValSet, Valuer
from attribution.errors import UserError
from attribution.train import distributed as dist_util
from attribution.train.step import ValuedStep
from attribution.train.store import ValueStore

LOSS_MEANS = ("sequence", "token")


def valset_from_texts(texts: Sequence[str], seq_len: int, names: Sequence[str] | None = None) -> ValSet:
    """A validation set from raw texts, tokenized with the GPT-2 tokenizer: each text whole, cut into
    `seq_len` sequences as `attribution run` cuts documents, and one per-example column per text."""
    from attribution.tokens import EOS_ID, chunk_document, encode_texts

    ids, mask, groups = [], [], []
    for text, tokens in enumerate(encode_texts(list(texts))):
        s_ids, s_mask = chunk_document(np.append(tokens, np.int32(EOS_ID)), seq_len)
        ids.extend(s_ids)
        mask.extend(s_mask)
        groups.extend([text] * len(s_ids))
    return ValSet(
        torch.from_numpy(np.stack(ids).astype(np.int64)),
        torch.from_numpy(np.stack(mask).astype(np.int64)),
        list(names) if names is not None else None,
        groups=groups,
    )


def label_tokens(mask: torch.Tensor) -> torch.Tensor:
    """`[n]` label tokens per sequence, as `LanguageModelingTask` counts them (label and input both real)."""
    return ((mask[:, 1:] > 0) & (mask[:, :-1] > 0)).sum(1)


@dataclass
class _StepPlan:
    """One optimizer step's micro-batches: how many, and the step's global sequence and label-token counts."""

    micro_batches: int
    sequences: float
    tokens: float
    done: int = 0


class _ValuationCallback(TrainerCallback):
    """Drives the valued step right before and right after the Trainer's `optimizer.step()`."""

    def __init__(self, trainer: ValuedTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        t = self.trainer
        lr = float(t.lr_scheduler.get_last_lr()[0])
        t.valued_step.before_optimizer_step(lr, t._grad_scale, getattr(t.optimizer, "optimizer", t.optimizer))

    def on_optimizer_step(self, args, state, control, **kwargs):
        t = self.trainer
        values = t.valued_step.after_optimizer_step()
        if values is None:
            return
        rows = dist_util.gather_rows(t.dist_info, np.concatenate(t._step_rows).astype(np.float64)).astype(
            np.int64
        )
        if t.value_store is not None:
            t.value_store.add(state.global_step + 1, rows, values.per_set, values.per_example)

    def on_train_end(self, args, state, control, **kwargs):
        t = self.trainer
        t.valued_step.finish()
        if t.value_store is not None:
            t.value_store.flush(t._flushed + 1, max(state.global_step, t._flushed + 1))
            t.value_store.finalize()
        t._flushed = state.global_step


class ValuedTrainer(Trainer):
    """A `Trainer` whose every optimizer step also values the training rows (see the module docstring)."""

    def __init__(
        self,
        *args,
        val_sets: Mapping[str, ValSet],
        docs: pd.DataFrame,
        value_dir: str | Path,
        order: int = 1,
        optimizer_aware: bool = False,
        per_example_max: int = 64,
        stage_window: int = 100,
        loss_mean: str = "sequence",
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if loss_mean not in LOSS_MEANS:
            raise UserError(f"loss_mean must be one of {', '.join(LOSS_MEANS)}, got {loss_mean!r}")
        missing = {"doc_id", "source", "owner"} - set(docs.columns)
        if missing:
            raise UserError(
                f"docs needs columns doc_id, source, owner (missing: {', '.join(sorted(missing))})"
            )
        self.loss_mean = loss_mean
        self.dist_info = dist_util.init_from_env(
            str(self.args.device)
        )  # accelerate has joined the group already
        per_example = [n for n, v in val_sets.items() if v.n_columns <= per_example_max]
        self.valuer = Valuer(
            self.model, val_sets, order=order, per_example=per_example, optimizer_aware=optimizer_aware
        )
        max_norm = self.args.max_grad_norm
        self.valued_step = ValuedStep(
            self.model,
            self.valuer,
            self.dist_info,
            max_grad_norm=max_norm if max_norm and max_norm > 0 else None,
        )
        self.value_store = (
            ValueStore(
                value_dir,
                docs,
                np.arange(len(docs)),
                list(val_sets),
                {n: val_sets[n].names for n in per_example},
                stage_window,
            )
            if self.dist_info.is_main
            else None
        )
        self._plan = _StepPlan(0, 0.0, 0.0)
        self._step_rows: list[np.ndarray] = []
        self._grad_scale = 1.0
        self._flushed = 0
        self.add_callback(_ValuationCallback(self))

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "doc_row" not in self._signature_columns:
            self._signature_columns.append("doc_row")  # keep the column that maps rows to documents

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer fetches an optimizer step's micro-batches up front: count the step's sequences and
        label tokens over every micro-batch and rank, which fixes each sequence's weight in the step."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        sequences = sum(int(b["input_ids"].shape[0]) for b in batch_samples)
        tokens = sum(int(label_tokens(_mask_of(b)).sum()) for b in batch_samples)
        total_sequences, total_tokens = dist_util.sum_over_ranks(self.dist_info, [sequences, tokens])
        self._plan = _StepPlan(len(batch_samples), total_sequences, total_tokens)
        self._step_rows = []
        return batch_samples, num_items_in_batch

    def _weights(self, mask: torch.Tensor) -> torch.Tensor | None:
        """Each sequence's weight in this rank's loss (None: the plain mean of this micro-batch).

        Ranks' gradients are averaged, so a rank's loss carries `world` times its sequences' global weights."""
        world, n = self.dist_info.world, mask.shape[0]
        if self.loss_mean == "token":
            return label_tokens(mask).double() * (world / max(self._plan.tokens, 1.0))
        if (
            self._plan.micro_batches == 1 and n * world == self._plan.sequences
        ):  # the plain mean is the step's loss
            return None
        return torch.full((n,), world / self._plan.sequences, dtype=torch.float64)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One micro-batch through the valued step; after the step's last one, the ranks' average and the clip factor."""
        self.model.train()
        inputs = self._prepare_inputs(inputs)
        if "doc_row" not in inputs:
            raise UserError("every training row needs a `doc_row` column (its document's row in `docs`)")
        self._step_rows.append(inputs["doc_row"].detach().cpu().numpy().astype(np.int64))
        mask = _mask_of(inputs)
        plan = self._plan
        # accumulated micro-batches are joined into one step (values() consumed the previous step's)
        loss = self.valued_step.backward(
            inputs["input_ids"], mask, weights=self._weights(mask), accumulate=plan.micro_batches > 1
        )
        plan.done += 1
        if plan.done == plan.micro_batches:
            self.valued_step.synchronize(loss)
            self._grad_scale = self.valued_step.clip(apply=False)  # the Trainer clips, by this very factor
        return torch.tensor(loss, device=self.args.device)


def _mask_of(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"]) if mask is None else mask
