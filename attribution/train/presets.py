"""Named model and optimizer settings, so a run is one flag away from the paper's setup or a CPU demo.

A preset fills every field of `RunConfig` that the user did not set. `gpt2-small` is the paper's
GPT-2 (124M) with its hyper-parameters; `cpu-tiny` is sized so that the built-in demo, report
included, finishes in a few minutes on two CPU cores while validation loss still clearly falls.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # Built-in demo on 2 CPU cores: real 50257-token vocabulary, short sequences, 2 layers.
    "cpu-tiny": {
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 64,
        "seq_len": 64,
        "batch_size": 16,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 8,
        "weight_decay": 0.1,
        "betas": (0.9, 0.95),
        "clip": 1.0,
        "steps": 80,
        "eval_every": 20,
        "log_every": 5,
        "checkpoint_every": 40,
        "keep_every": 20,
        "reference": 16,  # two or more documents of each of the 7 built-in sources; cost in docs/benchmarks.md
        "stage_window": 20,
        "dtype": "float32",
    },
    # The paper's setup: GPT-2 124M, T=1024, batch 16, AdamW 6e-4 -> 6e-5, wd 0.1, betas 0.9/0.95, clip 1.0.
    "gpt2-small": {
        "n_layer": 12,
        "n_head": 12,
        "n_embd": 768,
        "seq_len": 1024,
        "batch_size": 16,
        "lr": 6e-4,
        "min_lr": 6e-5,
        "warmup_steps": 2000,
        "weight_decay": 0.1,
        "betas": (0.9, 0.95),
        "clip": 1.0,
        "steps": 100_000,
        "eval_every": 500,
        "log_every": 50,
        "checkpoint_every": 1000,
        "keep_every": 1000,
        "reference": 64,
        "stage_window": 1000,
        "dtype": "auto",
    },
    # A few-second model for tests and smoke runs (real vocabulary, so it still uses the real tokenizer).
    "test-micro": {
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 32,
        "seq_len": 32,
        "batch_size": 4,
        "lr": 1e-3,
        "min_lr": 1e-4,
        "warmup_steps": 2,
        "weight_decay": 0.1,
        "betas": (0.9, 0.95),
        "clip": 1.0,
        "steps": 6,
        "eval_every": 3,
        "log_every": 1,
        "checkpoint_every": 3,
        "keep_every": 2,
        "reference": 0,  # tests that need one ask for it; the others keep every document in training
        "stage_window": 3,
        "dtype": "float32",
    },
}


def preset_names() -> list[str]:
    """Names accepted by `--preset`."""
    return list(PRESETS)
