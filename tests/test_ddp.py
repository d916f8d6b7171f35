"""Two processes (torchrun, gloo on 127.0.0.1) value the same run as one process does."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.train_fixtures import subprocess_env, torchrun, write_corpus, write_val


def _run(prefix: list[str], tmp_path, out, extra: str = "") -> subprocess.CompletedProcess:
    (tmp_path / "run.toml").write_text(
        'dtype = "float64"\nbatch_size = 4\nsteps = 4\ncheckpoint_every = 2\n' + extra
    )
    args = [
        "run",
        "--config",
        str(tmp_path / "run.toml"),
        "--corpus",
        str(tmp_path / "corpus.jsonl"),
        "--val",
        f"a={tmp_path / 'a.jsonl'}",
        "--val",
        f"b={tmp_path / 'b.jsonl'}",
        "--out",
        str(out),
        "--preset",
        "test-micro",
        "--device",
        "cpu",
        "--seed",
        "5",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    env = subprocess_env()
    return subprocess.run(
        [*prefix, "-m", "attribution.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra", ["optimizer_aware = false\n", "optimizer_aware = true\n"], ids=["sgd-proxy", "optimizer-aware"]
)
def test_two_gloo_processes_equal_one(tmp_path, extra):
    """Also optimizer-aware: Adam's path rule depends on the *global* batch size, which each rank must use
    although the loop averages gradients itself (no DDP wrapper to ask)."""
    write_corpus(tmp_path)
    write_val(tmp_path, "a", 3, seed=1)
    write_val(tmp_path, "b", 2, seed=2)
    one = _run([sys.executable], tmp_path, tmp_path / "one", extra)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(torchrun(), tmp_path, tmp_path / "two", extra)
    assert two.returncode == 0, two.stderr[-3000:]

    training = json.loads((tmp_path / "two" / "manifest.json").read_text())["training"]
    assert training["world_size"] == 2
    assert training["values"] == ("adam-aware" if "true" in extra else "sgd-proxy")
    for name, keys in (
        ("doc_values", ["doc_id", "val_set"]),
        ("example_values", ["doc_id", "val_set", "val_id"]),
        ("step_values", ["step", "doc_id", "val_set"]),
    ):
        a = pd.read_parquet(tmp_path / "one" / f"{name}.parquet").sort_values(keys).reset_index(drop=True)
        b = pd.read_parquet(tmp_path / "two" / f"{name}.parquet").sort_values(keys).reset_index(drop=True)
        assert len(a) == len(b) > 0
        pd.testing.assert_frame_equal(a[keys], b[keys])
        assert np.abs(a["value"]).max() > 0
        np.testing.assert_allclose(b["value"], a["value"], rtol=1e-9, atol=1e-12 * np.abs(a["value"]).max())
    la = pd.read_csv(tmp_path / "one" / "train_log.csv")
    lb = pd.read_csv(tmp_path / "two" / "train_log.csv")
    np.testing.assert_allclose(lb["train_loss"].dropna(), la["train_loss"].dropna(), rtol=1e-10)
