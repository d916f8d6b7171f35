"""A tiny float64 GPT-2 trained by `ValuedTrainer` on random ragged rows (no tests in this file).

Also a script, so that torchrun can start it on several processes:
    python tests/hf_fixtures.py OUT BATCH ACCUMULATION STEPS [LOSS_MEAN]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

N_ROWS, T, VOCAB = 16, 12, 64
LR, MAX_GRAD_NORM = 1e-2, 0.5


def tiny_model():
    """1-layer GPT-2, float64, dropout 0, the same weights every call."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).double()


def rows() -> dict[str, np.ndarray]:
    """Training rows with different lengths (one has no label token at all), one document each."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (N_ROWS, T))
    lengths = rng.integers(2, T + 1, N_ROWS)
    lengths[0], lengths[1] = T, 1  # row 1: a single token, so no label: weight 0 under the token mean
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "doc_row": np.arange(N_ROWS)}


def val_set():
    from attribution.engine.valuer import ValSet

    rng = np.random.default_rng(1)
    mask = np.ones((3, T), dtype=np.int64)
    mask[2, 7:] = 0
    return ValSet(torch.from_numpy(rng.integers(0, VOCAB, (3, T))), torch.from_numpy(mask), ["a", "b", "c"])


def docs() -> pd.DataFrame:
    return pd.DataFrame({"doc_id": [f"d{i:02d}" for i in range(N_ROWS)], "source": "s", "owner": "o"})


def train_valued(
    out: Path, *, batch: int, accumulation: int, steps: int, loss_mean: str = "sequence", order: int = 1
) -> Path:
    """Train with ValuedTrainer (constant lr, clipping active); returns the value directory."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from attribution.train.hf import ValuedTrainer

    args = TrainingArguments(
        output_dir=str(out / "hf"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=MAX_GRAD_NORM,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    data = {k: v.tolist() for k, v in rows().items()}
    trainer = ValuedTrainer(
        model=tiny_model(),
        args=args,
        train_dataset=Dataset.from_dict(data),
        val_sets={"v": val_set()},
        docs=docs(),
        value_dir=out / "values",
        order=order,
        loss_mean=loss_mean,
    )
    trainer.train()
    return out / "values"


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, batch, accumulation, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    train_valued(
        out,
        batch=batch,
        accumulation=accumulation,
        steps=steps,
        loss_mean=sys.argv[5] if len(sys.argv) > 5 else "sequence",
    )
