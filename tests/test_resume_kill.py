"""`kill -9` in the middle of a run, then `--resume`: the same values, bit for bit, as a run never killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.train_fixtures import VALUE_FILES, write_corpus, write_val

STEPS, EVERY = 10, 3


def _args(tmp_path, out, order=1):
    return [
        "run",
        "--order",
        str(order),
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
        "--steps",
        str(STEPS),
        "--steps-per-checkpoint",
        str(EVERY),
        "--seed",
        "3",
        "--device",
        "cpu",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--per-example-max",
        "3",
    ]


def _cli(args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "attribution.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **kw,
    )


def _checkpoint_step(out) -> int:
    try:
        return json.loads((out / "checkpoints" / "state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("order", [1, 2])
def test_kill_9_then_resume_equals_uninterrupted(tmp_path, order):
    write_corpus(tmp_path)
    write_val(tmp_path, "a", 3, seed=1)
    write_val(tmp_path, "b", 4, seed=2)  # more than --per-example-max: whole-set values only

    full = _cli(_args(tmp_path, tmp_path / "full", order))
    assert full.wait(timeout=300) == 0, full.stderr.read().decode()

    out = tmp_path / "killed"
    proc = _cli(_args(tmp_path, out, order))
    deadline = time.time() + 300
    while _checkpoint_step(out) < EVERY and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _checkpoint_step(out)
    assert proc.returncode == -signal.SIGKILL
    assert EVERY <= killed_at < STEPS, f"the run was not killed mid-way (checkpoint at {killed_at})"
    assert not (out / "doc_values.parquet").exists()

    again = _cli([*_args(tmp_path, out, order), "--resume"])
    assert again.wait(timeout=300) == 0, again.stderr.read().decode()

    for name in VALUE_FILES:
        a = pd.read_parquet(tmp_path / "full" / f"{name}.parquet")
        b = pd.read_parquet(out / f"{name}.parquet")
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)
    steps = pd.read_parquet(out / "step_values.parquet")
    assert sorted(steps["step"].unique()) == list(range(1, STEPS + 1))  # nothing lost, nothing twice
    assert not steps.duplicated(["step", "doc_id", "val_set"]).any()
    log = pd.read_csv(out / "train_log.csv")
    assert log["step"].tolist() == pd.read_csv(tmp_path / "full" / "train_log.csv")["step"].tolist()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed_from"] == [killed_at]


def test_run_refuses_to_overwrite_without_resume(tmp_path):
    write_corpus(tmp_path)
    write_val(tmp_path, "a")
    write_val(tmp_path, "b")
    out = tmp_path / "r"
    (out / "checkpoints").mkdir(parents=True)
    p = _cli(_args(tmp_path, out))
    assert p.wait(timeout=120) == 2
    err = p.stderr.read().decode()
    assert "error:" in err and "--resume" in err and "Traceback" not in err
