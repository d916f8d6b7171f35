"""The value store and checkpoints on their own: sums per document, normalisation, crash safety."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from attribution.train.store import ValueStore, normalizer


def _docs(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "doc_id": [f"d{i}" for i in range(n)],
            "source": ["a", "b"] * (n // 2) + ["a"] * (n % 2),
            "owner": "o",
            "license": None,
            "n_tokens": 10,
            "n_seqs": 1,
        }
    )


def _store(tmp_path, window: int = 2) -> ValueStore:
    # doc 0 has three sequences (0, 1, 2), doc 1 one (3), doc 2 two (4, 5)
    seq_doc = np.array([0, 0, 0, 1, 2, 2])
    return ValueStore(tmp_path, _docs(3), seq_doc, ["s1", "s2"], {"s1": ["v0", "v1"]}, stage_window=window)


def test_document_gets_the_sum_of_its_sequences(tmp_path):
    store = _store(tmp_path)
    v1 = np.array([0.5, 0.25, -1.0, 2.0])
    store.add(
        1, np.array([0, 2, 3, 1]), {"s1": v1, "s2": -v1}, {"s1": np.arange(8, dtype=float).reshape(4, 2)}
    )
    store.add(2, np.array([4, 5, 0, 3]), {"s1": np.array([1.0, 1.0, 3.0, 0.0]), "s2": np.zeros(4)})
    store.flush(1, 2)
    store.finalize()
    dv = pd.read_parquet(tmp_path / "doc_values.parquet")
    s1 = dv[dv.val_set == "s1"].set_index("doc_id")
    # d0: seqs 0, 2, 1 at step 1 (0.5 + 0.25 + 2.0), seq 0 at step 2 (3.0)
    assert s1.loc["d0", "value"] == pytest.approx(0.5 + 0.25 + 2.0 + 3.0)
    assert s1.loc["d1", "value"] == pytest.approx(-1.0 + 0.0)
    assert s1.loc["d2", "value"] == pytest.approx(2.0)
    assert s1.loc["d0", "n_seen"] == 4 and s1.loc["d2", "n_seen"] == 2
    assert (
        s1.loc["d2", "first_step"] == 2 and s1.loc["d0", "first_step"] == 1 and s1.loc["d0", "last_step"] == 2
    )
    assert list(dv.columns) == [
        "doc_id",
        "source",
        "owner",
        "val_set",
        "value",
        "value_normalized",
        "n_seen",
        "first_step",
        "last_step",
    ]
    ev = pd.read_parquet(tmp_path / "example_values.parquet").set_index(["doc_id", "val_id"])
    # per-example rows: batch rows 0,1,3 belong to d0 (0+2+6, 1+3+7), row 2 to d1
    assert ev.loc[("d0", "v0"), "value"] == 0 + 2 + 6 and ev.loc[("d0", "v1"), "value"] == 1 + 3 + 7
    assert ev.loc[("d1", "v1"), "value"] == 5
    steps = pd.read_parquet(tmp_path / "step_values.parquet")
    assert steps.groupby(["doc_id", "val_set"])["value"].sum().loc[("d0", "s1")] == pytest.approx(5.75)
    assert (
        len(steps[(steps.step == 1) & (steps.val_set == "s1")]) == 2
    )  # one row per document, not per sequence


def test_normalised_values_divide_by_each_steps_reduction(tmp_path):
    store = _store(tmp_path, window=1)
    store.add(1, np.array([0, 3]), {"s1": np.array([3.0, 1.0]), "s2": np.array([1.0, -1.0])})
    store.add(2, np.array([0, 3]), {"s1": np.array([0.03, 0.01]), "s2": np.array([0.0, 0.0])})
    s1 = store.doc_values_frame().query("val_set == 's1'").set_index("doc_id")
    # each step hands out one unit: 3/4 + 0.03/0.04
    assert s1.loc["d0", "value_normalized"] == pytest.approx(0.75 + 0.75)
    assert s1.loc["d0", "value"] == pytest.approx(3.03)
    # cancelling values are divided by 10% of their gross, not by ~0
    assert normalizer(np.array([1.0, -1.0])) == pytest.approx(0.2)
    s2 = store.doc_values_frame().query("val_set == 's2'").set_index("doc_id")
    assert s2.loc["d0", "value_normalized"] == pytest.approx(5.0)
    assert np.isfinite(s2["value_normalized"]).all()  # the all-zero step contributes 0, not NaN


def test_stage_values_sum_steps_per_window_and_source(tmp_path):
    store = _store(tmp_path, window=2)
    for step in range(1, 6):
        store.add(step, np.array([0, 3]), {"s1": np.array([step, 10.0 * step]), "s2": np.zeros(2)})
        if step in (2, 4, 5):
            store.flush(step - (1 if step != 5 else 0), step)
    store.finalize()
    st = pd.read_parquet(tmp_path / "stage_values.parquet")
    assert list(st.columns) == [
        "window_start",
        "window_end",
        "source",
        "val_set",
        "value",
        "value_normalized",
    ]
    a = st[(st.source == "a") & (st.val_set == "s1")].set_index("window_start")
    assert a.loc[1, "value"] == 1 + 2 and a.loc[3, "value"] == 3 + 4 and a.loc[5, "value"] == 5
    assert a.loc[5, "window_end"] == 5
    b = st[(st.source == "b") & (st.val_set == "s1")]
    assert b["value"].sum() == 10 * (1 + 2 + 3 + 4 + 5)


def test_resume_discards_rows_after_the_checkpoint(tmp_path):
    """Rows flushed after the last checkpoint are recomputed on resume, so never counted twice."""
    full = _store(tmp_path / "full")
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 6, 3), rng.normal(size=3)) for _ in range(6)]
    for step, (idx, v) in enumerate(batches, 1):
        full.add(step, idx, {"s1": v, "s2": v})
    full.flush(1, 6)
    full.finalize()

    crashed = _store(tmp_path / "crash")
    for step, (idx, v) in enumerate(batches[:4], 1):
        crashed.add(step, idx, {"s1": v, "s2": v})
        if step == 2:
            crashed.flush(1, 2)
            saved = {k: a.copy() for k, a in crashed.state_arrays().items()}
    crashed.flush(3, 4)  # written, but the "checkpoint" at step 4 never happened
    resumed = _store(tmp_path / "crash")
    resumed.load_state_arrays(saved)
    resumed.discard_after(2)
    for step, (idx, v) in enumerate(batches[2:], 3):
        resumed.add(step, idx, {"s1": v, "s2": v})
    resumed.flush(3, 6)
    resumed.finalize()
    for name in ("doc_values", "step_values", "stage_values", "example_values"):
        a = pq.read_table(tmp_path / "full" / f"{name}.parquet").to_pandas()
        b = pq.read_table(tmp_path / "crash" / f"{name}.parquet").to_pandas()
        pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_checkpoint_round_trip_and_interrupted_swap(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from attribution.train import checkpoint as ckpt

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 50, (2, 8)), labels=torch.randint(0, 50, (2, 8))).loss.backward()
    opt.step()
    arrays = {"value": np.arange(6, dtype=np.float64).reshape(3, 2) / 7}
    ckpt.save_checkpoint(tmp_path, model, opt, {"step": 1}, arrays, {"torch": torch.get_rng_state()})
    ckpt.save_checkpoint(tmp_path, model, opt, {"step": 2}, arrays, {"torch": torch.get_rng_state()})

    model2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=5.0)
    # simulate a crash between the two renames of the swap
    (tmp_path / "checkpoints").rename(tmp_path / ".checkpoints.old")
    (tmp_path / ".checkpoints.new-999").mkdir()
    loaded = ckpt.load_checkpoint(tmp_path, model2, opt2)
    assert loaded is not None and loaded.state["step"] == 2
    assert not (tmp_path / ".checkpoints.new-999").exists()
    for (n1, p1), (_, p2) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(p1, p2), n1
    assert model2.lm_head.weight.data_ptr() == model2.transformer.wte.weight.data_ptr()  # still tied
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == 1e-3
    for k in s1["state"]:
        for name, t in s1["state"][k].items():
            assert torch.equal(t, s2["state"][k][name])
    np.testing.assert_array_equal(loaded.arrays["value"], arrays["value"])
