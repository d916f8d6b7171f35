"""`attribution.workflows.curate`: the selection rules, the steps-to-target measure and the written outputs.

Training-free: the curves are given, so every expected number is worked out by hand. The end-to-end
retrain is in test_curate_run.py.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from attribution.errors import UserError
from attribution.workflows import curate as cu


def write_values(run_dir, values):
    """A run directory with only what selection reads: docs.parquet and doc_values.parquet (two sets)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    n = len(values)
    ids = [f"doc{i}" for i in range(n)]
    sources = ["web" if i % 2 else "books" for i in range(n)]
    pd.DataFrame(
        {"doc_id": ids, "source": sources, "owner": "o", "n_tokens": np.arange(1, n + 1) * 10}
    ).to_parquet(run_dir / "docs.parquet")
    # split each value over two validation sets so the "all sets" total is the given value
    dv = pd.DataFrame(
        {
            "doc_id": ids * 2,
            "source": sources * 2,
            "val_set": ["a"] * n + ["b"] * n,
            "value": [v * 0.25 for v in values] + [v * 0.75 for v in values],
        }
    )
    dv.to_parquet(run_dir / "doc_values.parquet")
    return run_dir


def test_parse_drop():
    assert cu.parse_drop("negative") == cu.DropRule("negative")
    assert cu.parse_drop("bottom:12.5") == cu.DropRule("bottom", 12.5)
    for bad in ("bottom:0", "bottom:100", "top:5", "bottom:x"):
        with pytest.raises(UserError):
            cu.parse_drop(bad)


def test_negative_drop_is_exactly_the_negative_documents(tmp_path):
    values = [1.0, -2.0, 0.0, -0.5, 3.0, 0.25, -1e-9, 2.0]
    run = write_values(tmp_path / "run", values)
    v = cu.document_values(run, None)
    assert v["value"].tolist() == pytest.approx(values)
    dropped = cu.select_drop(v, cu.parse_drop("negative"))
    assert dropped["doc_id"].tolist() == ["doc1", "doc3", "doc6"]  # lowest first
    assert len(dropped) / len(v) == pytest.approx((np.array(values) < 0).mean())
    # one set only: same signs here, a quarter of the value
    va = cu.document_values(run, "a")
    assert va["value"].tolist() == pytest.approx([x * 0.25 for x in values])
    with pytest.raises(UserError, match="unknown validation set"):
        cu.document_values(run, "zzz")


def test_bottom_pct_and_random_control(tmp_path):
    values = list(np.linspace(-1, 1, 20))
    v = cu.document_values(write_values(tmp_path / "run", values), None)
    dropped = cu.select_drop(v, cu.parse_drop("bottom:25"))
    assert dropped["doc_id"].tolist() == [f"doc{i}" for i in range(5)]
    ctrl = cu.random_drop(v, 5, seed=3)
    assert len(ctrl) == 5 and ctrl["doc_id"].is_unique
    assert ctrl["doc_id"].tolist() == cu.random_drop(v, 5, seed=3)["doc_id"].tolist()
    assert ctrl["doc_id"].tolist() != cu.random_drop(v, 5, seed=4)["doc_id"].tolist()
    br = cu.source_breakdown(v, dropped).set_index("source")
    assert br.loc["books", "dropped"] == 3 and br.loc["web", "dropped"] == 2
    assert br["share_of_dropped"].sum() == pytest.approx(1.0)
    assert br.loc["books", "fraction_of_source_dropped"] == pytest.approx(0.3)


def test_val_loss_curve_reads_the_log_layouts():
    log = pd.DataFrame(
        {
            "step": [1, 2, 3, 4],
            "lr": 0.1,
            "train_loss": 5.0,
            "val_loss[a]": [np.nan, 4.0, np.nan, 3.0],
            "val_loss[b]": [np.nan, 6.0, np.nan, 5.0],
        }
    )
    assert cu.val_loss_curve(log, "a").to_dict() == {2: 4.0, 4: 3.0}
    assert cu.val_loss_curve(log, None).to_dict() == {2: 5.0, 4: 4.0}
    other = log.rename(columns={"val_loss[a]": "val_loss_a", "val_loss[b]": "val_loss_b"})
    assert cu.val_loss_curve(other, "b").to_dict() == {2: 6.0, 4: 5.0}
    with pytest.raises(UserError, match="no validation loss for set"):
        cu.val_loss_curve(log, "c")


def test_steps_to_target_with_smoothing():
    curve = pd.Series([5.0, 4.0, 3.5, 3.0, 3.2, 2.9], index=[10, 20, 30, 40, 50, 60])
    assert cu.steps_to_target(curve, 3.0) == 40
    assert cu.steps_to_target(curve, 1.0) is None
    sm = cu.smooth(curve, 2)
    assert sm.loc[50] == pytest.approx(3.1)
    assert cu.steps_to_target(sm, 3.05) == 60


def test_analyse_writes_consistent_outputs(tmp_path):
    values = [1.0, -2.0, 0.5, -0.5, 3.0, 0.25, 1.0, 2.0]
    v = cu.document_values(write_values(tmp_path / "run", values), None)
    rule = cu.parse_drop("negative")
    dropped = cu.select_drop(v, rule)
    ctrl = cu.random_drop(v, len(dropped), seed=0)
    steps = [10, 20, 30, 40, 50]
    curves = {
        "baseline": pd.Series([5.0, 4.0, 3.4, 3.1, 3.0], index=steps),
        "curated": pd.Series([4.8, 3.6, 3.0, 2.9, 2.8], index=steps),  # reaches 3.0 at step 30
        "random": pd.Series([5.0, 4.1, 3.6, 3.3, 3.2], index=steps),  # never reaches it
    }
    out = tmp_path / "out"
    r = cu.analyse(
        curves, v, dropped, {"random": ctrl}, rule, None, out, smooth_window=1, baseline_reused=False
    )
    assert r.target == 3.0
    assert r.steps == {"baseline": 50, "curated": 30, "random": None}
    assert r.saving["curated"] == pytest.approx(0.4) and r.saving["random"] is None
    assert r.dropped_fraction == pytest.approx(0.25) == r.negative_fraction
    assert r.dropped_token_fraction == pytest.approx((20 + 40) / 360)
    for name in (
        "curves.csv",
        "curves.png",
        "steps_to_target.csv",
        "dropped.csv",
        "random_dropped.csv",
        "dropped_sources.csv",
        "summary.md",
        "summary.json",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    table = pd.read_csv(out / "steps_to_target.csv").set_index("run")
    assert table.loc["curated", "steps_to_target"] == 30 and pd.isna(table.loc["random", "steps_to_target"])
    assert set(pd.read_csv(out / "dropped.csv")["doc_id"]) == {"doc1", "doc3"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"]["curated"] == 30
    md = (out / "summary.md").read_text()
    assert "| curated | 2 | 30 | +40.0% |" in md and "| random | 2 | not reached |" in md
    assert "random-drop" in md


def test_several_controls_are_reported_with_their_spread(tmp_path):
    values = [1.0, -2.0, 0.5, -0.5, 3.0, 0.25, 1.0, 2.0]
    v = cu.document_values(write_values(tmp_path / "run", values), None)
    rule = cu.parse_drop("negative")
    dropped = cu.select_drop(v, rule)
    controls = {cu.control_name(k): cu.random_drop(v, len(dropped), seed=k) for k in range(3)}
    assert list(controls) == ["random", "random-2", "random-3"]
    steps = [10, 20, 30, 40]
    curves = {
        "baseline": pd.Series([5.0, 4.0, 3.5, 3.0], index=steps),
        "curated": pd.Series([4.5, 3.0, 2.9, 2.8], index=steps),  # step 20
        "random": pd.Series([5.0, 4.0, 3.0, 2.9], index=steps),  # step 30
        "random-2": pd.Series([5.0, 4.0, 3.4, 3.0], index=steps),  # step 40
        "random-3": pd.Series([5.0, 3.0, 3.4, 3.0], index=steps),  # step 20
    }
    out = tmp_path / "out"
    r = cu.analyse(curves, v, dropped, controls, rule, None, out, smooth_window=1, baseline_reused=False)
    assert r.steps == {"baseline": 40, "curated": 20, "random": 30, "random-2": 40, "random-3": 20}
    # mean control 30 steps vs curated 20: 10 steps = 25% of the baseline's 40 in favour of curation
    assert any("20 vs 30 steps (range 20-40 over 3 seeds)" in n and "+25.0%" in n for n in r.notes)
    table = pd.read_csv(out / "steps_to_target.csv")
    assert table["run"].tolist() == list(curves) and table["documents_dropped"].tolist() == [0, 2, 2, 2, 2]
    assert (out / "random_3_dropped.csv").is_file()
    assert set(pd.read_csv(out / "curves.csv").columns) >= {"step", "random-3", "random-3_smoothed"}
