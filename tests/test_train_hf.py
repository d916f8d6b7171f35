"""A stock Hugging Face Trainer script values its data with ValuedTrainer (a few added lines)."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch


@pytest.mark.slow
def test_valued_trainer_writes_values_matching_a_direct_computation(tmp_path):
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from attribution.engine.task import LanguageModelingTask
    from attribution.train.hf import ValuedTrainer, valset_from_texts

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=50257,
            n_positions=16,
            n_embd=16,
            n_layer=1,
            n_head=2,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
        )
    )
    init = copy.deepcopy(model)
    rng = np.random.default_rng(0)
    n, t = 12, 16
    ids = rng.integers(0, 500, (n, t))
    docs = pd.DataFrame({"doc_id": [f"d{i}" for i in range(n)], "source": "s", "owner": "o"})
    rows = {
        "input_ids": ids.tolist(),
        "attention_mask": np.ones((n, t), int).tolist(),
        "doc_row": list(range(n)),
    }
    val = valset_from_texts(
        ["the court held that copyright protects expression", "owners are paid"], seq_len=t
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=0.5,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = ValuedTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(rows),
        val_sets={"v": val},
        docs=docs,
        value_dir=tmp_path / "values",
    )
    trainer.train()

    dv = pd.read_parquet(tmp_path / "values" / "doc_values.parquet")
    steps = pd.read_parquet(tmp_path / "values" / "step_values.parquet")
    assert set(steps["step"]) == {1, 2, 3}
    assert dv["n_seen"].sum() == 12  # 3 steps x 4 rows
    np.testing.assert_allclose(
        dv.set_index("doc_id")["value"].sort_index(),
        steps.groupby("doc_id")["value"].sum().reindex(sorted(dv.doc_id), fill_value=0),
    )
    ev = pd.read_parquet(tmp_path / "values" / "example_values.parquet")
    assert set(ev["val_id"]) == {"0", "1"}

    # Step 1 by hand: the batch's values add up to lr * c * <grad L_val, mean_i grad l_i> at the initial weights.
    step1 = steps[steps.step == 1]
    first_rows = [int(d[1:]) for d in step1.doc_id]
    assert len(first_rows) == 4
    task = LanguageModelingTask()
    batch = torch.tensor(ids[first_rows])
    init.zero_grad()
    task.per_sequence_loss(init, batch, torch.ones_like(batch)).mean().backward()
    g_train = [p.grad.clone() for p in init.parameters()]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in g_train))
    c = min(1.0, 0.5 / (float(norm) + 1e-6))
    init.zero_grad()
    task.per_sequence_loss(init, val.ids, val.mask).sum().backward()
    dot = sum((p.grad.double() * g.double()).sum() for p, g in zip(init.parameters(), g_train, strict=True))
    assert step1["value"].sum() == pytest.approx(1e-2 * c * float(dot), rel=2e-3)


def test_valset_from_texts_values_each_text_whole():
    """A text longer than `seq_len` is all of its sequences, one per-example column (`ValSet(groups=)`),
    cut as `attribution run` cuts documents."""
    from attribution.tokens import EOS_ID, chunk_document, encode_texts
    from attribution.train.hf import valset_from_texts

    texts = ["short one", "a much longer text " * 12, "mid length text here"]
    vs = valset_from_texts(texts, seq_len=8, names=["a", "b", "c"])
    counts = [len(chunk_document(np.append(t, np.int32(EOS_ID)), 8)[0]) for t in encode_texts(texts)]
    assert counts[1] > 1 and len(vs) == sum(counts) and vs.n_columns == 3 and vs.names == ["a", "b", "c"]
    assert vs.groups.tolist() == [c for c, k in enumerate(counts) for _ in range(k)]
    long = vs.ids[vs.groups == 1][vs.mask[vs.groups == 1] > 0]
    assert long.tolist() == [*encode_texts([texts[1]])[0].tolist(), EOS_ID]
