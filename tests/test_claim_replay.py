"""`attribution claim`: replay of a finished run gives the run's own values, verified at every kept link."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from attribution.errors import UserError
from attribution.train import RunConfig, train_and_value
from attribution.workflows.claim import claim
from tests.train_fixtures import write_corpus, write_val


def _run(tmp_path, name: str, **kw) -> "object":
    cfg = RunConfig(corpus=[str(tmp_path / "corpus.jsonl")], val={"a": str(tmp_path / "a.jsonl")},
                    out=str(tmp_path / name), preset="test-micro", steps=6, seed=3, device="cpu",
                    cache_dir=str(tmp_path / "cache"), progress=False, **kw)
    return train_and_value(cfg)


def _examples(run, val_set: str) -> pd.DataFrame:
    ev = pd.read_parquet(run / "example_values.parquet")
    ev = ev[ev["val_set"] == val_set].sort_values(["doc_id", "val_id"]).reset_index(drop=True)
    return ev[["doc_id", "val_id", "value", "value_normalized", "value_cosine"]]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("claim")
    write_corpus(tmp)
    write_val(tmp, "a", 3)
    return tmp


@pytest.mark.parametrize(("order", "aware"), [(1, False), (2, True)])
def test_replay_equals_in_run_bitwise(corpus_dir, tmp_path, order, aware):
    run = _run(corpus_dir, f"run{order}{aware}", order=order, optimizer_aware=aware)
    out = claim(run, corpus_dir / "a.jsonl", tmp_path / "claim", report=False, progress=False)
    got, want = _examples(out, "claims"), _examples(run, "a")
    assert len(want) > 0
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["claim"]["verified"] == "bitwise" and manifest["claim"]["replayed_steps"] == 6
