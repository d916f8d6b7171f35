"""ValuedTrainer parity with the Trainer's own features: gradient accumulation, several processes,
HF's token-mean loss, and the README's example."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hf_fixtures import LR, MAX_GRAD_NORM, rows, tiny_model, train_valued, val_set
from train_fixtures import subprocess_env, torchrun

from attribution.engine.exact import per_sample_grads

KEYS = {
    "step_values": ["step", "doc_id", "val_set"],
    "doc_values": ["doc_id", "val_set"],
    "example_values": ["doc_id", "val_set", "val_id"],
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_same_values(a: Path, b: Path) -> None:
    """Every value file of two value directories: same rows, values equal to float64 rounding."""
    for name, keys in KEYS.items():
        x = pd.read_parquet(a / f"{name}.parquet").sort_values(keys).reset_index(drop=True)
        y = pd.read_parquet(b / f"{name}.parquet").sort_values(keys).reset_index(drop=True)
        assert len(x) == len(y) > 0
        pd.testing.assert_frame_equal(x[keys], y[keys])
        scale = np.abs(x["value"]).max()
        assert scale > 0
        np.testing.assert_allclose(y["value"], x["value"], rtol=1e-12, atol=1e-13 * scale)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("order", "loss_mean", "micro", "accumulation"),
    [
        (1, "sequence", 2, 4),
        (2, "sequence", 2, 4),
        (1, "token", 2, 4),
        (1, "sequence", 4, 4),
        (2, "token", 4, 4),
    ],
)
def test_gradient_accumulation_gives_the_values_of_the_big_batch(
    tmp_path, order, loss_mean, micro, accumulation
):
    """`accumulation` micro-batches of `micro` rows give the values of one batch of micro * accumulation."""
    big = train_valued(
        tmp_path / "big",
        batch=micro * accumulation,
        accumulation=1,
        steps=2,
        order=order,
        loss_mean=loss_mean,
    )
    accumulated = train_valued(
        tmp_path / "acc", batch=micro, accumulation=accumulation, steps=2, order=order, loss_mean=loss_mean
    )
    assert set(pd.read_parquet(big / "step_values.parquet")["step"]) == {1, 2}
    assert_same_values(big, accumulated)


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path):
    script = Path(__file__).with_name("hf_fixtures.py")
    env = subprocess_env()
    # 2 ranks x micro-batch 2 x accumulation 2 = the single process's batch of 8
    two = subprocess.run(
        [*torchrun(), str(script), str(tmp_path / "two"), "2", "2", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = train_valued(tmp_path / "one", batch=8, accumulation=1, steps=2)
    assert_same_values(one, tmp_path / "two" / "values")


def _token_mean_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM loss over a whole step: summed cross-entropy of every label token / their number."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(~((mask[:, 1:] > 0) & (mask[:, :-1] > 0)), -100)
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum", ignore_index=-100
    )
    return ce / (labels != -100).sum()


@pytest.mark.slow
def test_token_mean_values_are_each_sequences_share_of_the_loss_gradient(tmp_path):
    values = train_valued(tmp_path / "tok", batch=8, accumulation=2, steps=1, loss_mean="token")
    step = pd.read_parquet(values / "step_values.parquet").set_index("doc_id")["value"].sort_index()
    assert len(step) == 16  # one step over every row

    model, data, val = tiny_model(), rows(), val_set()
    ids, mask = torch.from_numpy(data["input_ids"]), torch.from_numpy(data["attention_mask"])
    per_sample = per_sample_grads(model, ids, mask).double()  # [n, D], each sequence's mean token loss
    tokens = ((mask[:, 1:] > 0) & (mask[:, :-1] > 0)).sum(1).double()
    share = tokens / tokens.sum()
    assert share[1] == 0  # the one-token row

    # the definition: the shares' gradients add up to the gradient of HF's token-mean loss
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(_token_mean_loss(model, ids, mask), params)
    direct = torch.cat([g.reshape(-1) for g in grads]).double()
    combined = share @ per_sample
    assert float((combined - direct).abs().max()) <= 1e-12 * float(direct.abs().max())

    clip = min(1.0, MAX_GRAD_NORM / (float(direct.norm()) + 1e-6))
    g_val = per_sample_grads(model, val.ids, val.mask).double().sum(0)
    expected = LR * clip * share * (per_sample @ g_val)
    got = torch.tensor(step.to_numpy())
    assert float(expected.abs().max()) > 0
    assert float((got - expected).abs().max()) <= 1e-10 * float(expected.abs().max())
    assert float(got[1]) == 0.0


def _readme_example() -> str:
    """The first python block of the README's Hugging Face section."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Hugging Face Trainer", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch):
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    code = _readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 6
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_positions=128, n_embd=16, n_layer=1, n_head=2))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50257, (8, 16))
    train_ds = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(), "doc_row": list(range(8))}
    )
    docs = pd.DataFrame({"doc_id": [f"d{i}" for i in range(8)], "source": "s", "owner": "o"})
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    monkeypatch.chdir(tmp_path)
    exec(
        compile(code, "README.md", "exec"),  # noqa: S102 - the README's own example
        {
            "model": model,
            "args": args,
            "train_ds": train_ds,
            "docs": docs,
            "my_texts": ["the court held that copyright protects expression", "owners are paid"],
        },
    )
    dv = pd.read_parquet(tmp_path / "runs" / "hf" / "doc_values.parquet")
    assert dv["n_seen"].sum() == 8  # 2 steps x 2 micro-batches x 2 rows
