"""Value the data of an existing Hugging Face `Trainer` script with a few added lines.

A plain `TrainerCallback` cannot reach the backward pass (the engine must run the forward/backward
itself to record per-sequence activations and output gradients), so this is a `Trainer` subclass
plus an internal callback for the points the subclass cannot see (just before/after
`optimizer.step()`)::

    from attribution.train.hf import ValuedTrainer, valset_from_texts
    trainer = ValuedTrainer(model=model, args=args, train_dataset=ds,          # ds has a `doc_row` column
                            val_sets={"mine": valset_from_texts(texts, seq_len=128)},
                            docs=docs_frame, value_dir="runs/hf")               # doc_id, source, owner
    trainer.train()                                                           # -> runs/hf/doc_values.parquet ...

What differs from a stock Trainer, and why:
- the loss is the mean over sequences of each sequence's mean token loss (`LanguageModelingTask`),
  so every sequence of a batch weighs the same and its value is its share of the step; HF's default
  is the mean over all tokens of the batch;
- values are for the clipped step: the clip factor `min(1, max_grad_norm / (||g|| + 1e-6))` is
  computed from the gradient before the Trainer clips it, exactly as torch will apply it;
- supported: one process, `gradient_accumulation_steps == 1`; for several processes use
  `attribution run` under torchrun.
- every training row needs `doc_row`: the row of its document in `docs` (a document cut into
  several rows gets the sum of their values).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import Trainer, TrainerCallback

from attribution.engine.valuer import StepValues, ValSet, Valuer
from attribution.errors import UserError
from attribution.train.store import ValueStore


def valset_from_texts(texts: Sequence[str], seq_len: int, names: Sequence[str] | None = None) -> ValSet:
    """A validation set from raw texts, tokenized with the GPT-2 tokenizer (first `seq_len` tokens each)."""
    from attribution.tokens import EOS_ID, chunk_document, encode_texts

    ids, mask = [], []
    for tokens in encode_texts(list(texts)):
        s_ids, s_mask = chunk_document(np.append(tokens, np.int32(EOS_ID)), seq_len)
        ids.append(s_ids[0])
        mask.append(s_mask[0])
    return ValSet(torch.from_numpy(np.stack(ids).astype(np.int64)), torch.from_numpy(np.stack(mask).astype(np.int64)),
                  list(names) if names is not None else None)


class _ValuationCallback(TrainerCallback):
    """Calls the engine right before and right after `optimizer.step()`."""

    def __init__(self, trainer: ValuedTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        t = self.trainer
        lr = float(t.lr_scheduler.get_last_lr()[0])
        optimizer = getattr(t.optimizer, "optimizer", t.optimizer)
        t._step_values = t.valuer.values(lr, grad_scale=t._grad_scale,
                                         optimizer=optimizer if t.valuer.optimizer_aware else None)

    def on_optimizer_step(self, args, state, control, **kwargs):
        t = self.trainer
        after = t.valuer.after_step()
        sv: StepValues | None = after if t.valuer.order == 2 else t._step_values
        if sv is not None:
            t.value_store.add(state.global_step + 1, t._batch_rows, sv.per_set, sv.per_example)

    def on_train_end(self, args, state, control, **kwargs):
        t = self.trainer
        t.value_store.flush(t._flushed + 1, max(state.global_step, t._flushed + 1))
        t._flushed = state.global_step
        t.value_store.finalize()


class ValuedTrainer(Trainer):
    """A `Trainer` whose every step also values the training rows (see the module docstring)."""

    def __init__(self, *args, val_sets: Mapping[str, ValSet], docs: pd.DataFrame, value_dir: str | Path,
                 order: int = 1, optimizer_aware: bool = False, per_example_max: int = 64,
                 stage_window: int = 100, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise UserError("ValuedTrainer supports gradient_accumulation_steps=1 only")
        if self.args.world_size > 1:
            raise UserError("ValuedTrainer runs in one process; use `attribution run` under torchrun for several")
        missing = {"doc_id", "source", "owner"} - set(docs.columns)
        if missing:
            raise UserError(f"docs needs columns doc_id, source, owner (missing: {', '.join(sorted(missing))})")
        per_example = [n for n, v in val_sets.items() if len(v) <= per_example_max]
        self.valuer = Valuer(self.model, val_sets, order=order, per_example=per_example,
                             optimizer_aware=optimizer_aware)
        self.value_store = ValueStore(value_dir, docs, np.arange(len(docs)), list(val_sets),
                                      {n: val_sets[n].names for n in per_example}, stage_window)
        self._grad_scale = 1.0
        self._batch_rows = np.zeros(0, dtype=np.int64)
        self._step_values: StepValues | None = None
        self._flushed = 0
        self.add_callback(_ValuationCallback(self))

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "doc_row" not in self._signature_columns:
            self._signature_columns.append("doc_row")  # keep the column that maps rows to documents

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Forward/backward through the engine; remember the batch's documents and the clip factor."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        if "doc_row" not in inputs:
            raise UserError("every training row needs a `doc_row` column (its document's row in `docs`)")
        self._batch_rows = inputs["doc_row"].detach().cpu().numpy().astype(np.int64)
        loss = self.valuer.forward_backward(inputs["input_ids"], inputs.get("attention_mask"))
        max_norm = self.args.max_grad_norm
        if max_norm and max_norm > 0:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads))
            self._grad_scale = min(1.0, max_norm / (norm + 1e-6))
        else:
            self._grad_scale = 1.0
        return torch.tensor(loss, device=self.args.device)
