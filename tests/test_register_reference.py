"""`benchmarks/register_reference.py`'s two pure steps: which rows form the reference under each of its
three references, and the original's rank with the control split by source (against `rank_of`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attribution.values.ranks import rank_of
from attribution.values.views import REFERENCE_SET

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["o-legal-1", "o-legal-2", "o-news-1", "c1", "c2", "c3"]
SOURCE = {"o-legal-1": "legal", "o-legal-2": "legal", "o-news-1": "news"}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "register_reference", ROOT / "benchmarks" / "register_reference.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(val_set: str, val_id: str, values) -> list[dict]:
    return [
        {"doc_id": d, "val_set": val_set, "val_id": val_id, "checkpoint_cosine": float(v)}
        for d, v in zip(DOCS, values, strict=True)
    ]


def test_the_three_references(bench):
    cos = pd.DataFrame(_rows("similar", "t", range(6)) + _rows(REFERENCE_SET, "r-run", range(6)))
    register = pd.DataFrame(_rows("x", "r-reg", range(6)))[["doc_id", "val_id", "checkpoint_cosine"]]

    def ref_ids(which):
        f = bench.with_reference(cos, register, which)
        return sorted(f.loc[f["val_set"] == REFERENCE_SET, "val_id"].unique())

    assert ref_ids("run") == ["r-run"]
    assert ref_ids("run+register") == ["r-reg", "r-run"]
    assert ref_ids("register") == ["r-reg"]  # the run's own reference kept, under another name
    assert "run_reference" in set(bench.with_reference(cos, register, "register")["val_set"])


def test_rank_and_the_control_split_by_source(bench):
    scores = [0.9, 0.5, 0.7, 0.1, 0.8, 0.2]  # the text's original is o-legal-1
    frame = pd.DataFrame(_rows("similar", "o-legal-1-similar", scores))
    record = {"id": "o-legal-1-similar", "meta": {"variant": "similar", "target_id": "o-legal-1"}}
    got = bench.ranks(frame, "checkpoint_cosine", [record], DOCS, SOURCE).iloc[0]
    s = np.asarray(scores)
    assert got["rank"] == rank_of(s, 0) == 1
    assert got["same_source"] == rank_of(s, 1) == 4  # o-legal-2
    assert got["other_source"] == rank_of(s, 2) == 3  # o-news-1
    assert got["control"] == pytest.approx((4 + 3) / 2) and got["kind"] == "similar"
