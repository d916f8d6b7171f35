"""`attribution run` end to end on a tiny model: files, columns, consistency, determinism, config."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from attribution.errors import UserError
from attribution.train import RunConfig, build_config, train_and_value
from attribution.values import Manifest
from attribution.values.views import DEFAULT_VIEW
from tests.train_fixtures import write_corpus, write_val


def _cfg(tmp_path, out: str, **kw) -> RunConfig:
    return RunConfig(
        corpus=[str(tmp_path / "corpus.jsonl")],
        val={"a": str(tmp_path / "a.jsonl"), "b": str(tmp_path / "b.jsonl")},
        out=str(tmp_path / out),
        preset="test-micro",
        steps=4,
        seed=7,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        progress=False,
        **kw,
    )


@pytest.mark.slow
def test_run_writes_every_file_consistently_and_deterministically(tmp_path):
    corpus = write_corpus(tmp_path)
    write_val(tmp_path, "a", 3)
    val_b = write_val(tmp_path, "b", 2, seed=5)
    # make one training document identical to a validation text: it must be warned about and not trained on
    lines = corpus.read_text().splitlines()
    clash = json.loads(lines[5])
    clash["text"] = json.loads(val_b.read_text().splitlines()[0])["text"]
    lines[5] = json.dumps(clash)
    corpus.write_text("\n".join(lines) + "\n")

    with pytest.warns(UserWarning, match="identical to a validation text"):
        run = train_and_value(_cfg(tmp_path, "r1", exclude_ids=("doc7",)))
    for name, cols in {
        "doc_values": [
            "doc_id",
            "source",
            "owner",
            "val_set",
            "value",
            "value_normalized",
            "n_seen",
            "first_step",
            "last_step",
        ],
        "example_values": ["doc_id", "val_set", "val_id", "value"],
        "stage_values": ["window_start", "window_end", "source", "val_set", "value", "value_normalized"],
        "step_values": ["step", "doc_id", "val_set", "value"],
        "docs": ["doc_id", "source", "owner", "license", "n_tokens", "n_seqs", "text"],
    }.items():
        frame = pd.read_parquet(run / f"{name}.parquet")
        assert set(cols) <= set(frame.columns), name
        assert len(frame) > 0, name
    dv = pd.read_parquet(run / "doc_values.parquet")
    assert "doc5" not in set(dv.doc_id) and "doc7" not in set(dv.doc_id)
    assert len(dv) == 2 * 22  # 24 documents, 2 kept out, 2 validation sets
    # per-document totals are the sums of the per-step rows; per-example values add up to the set's value
    steps = pd.read_parquet(run / "step_values.parquet")
    by_doc = steps.groupby(["doc_id", "val_set"])["value"].sum()
    seen = dv[dv.n_seen > 0].set_index(["doc_id", "val_set"])["value"]
    np.testing.assert_allclose(seen.sort_index(), by_doc.reindex(seen.sort_index().index), rtol=1e-12)
    ev = pd.read_parquet(run / "example_values.parquet")
    per_ex = ev.groupby(["doc_id", "val_set"])["value"].sum()
    np.testing.assert_allclose(per_ex.sort_index(), seen.reindex(per_ex.sort_index().index), rtol=1e-9)
    log = pd.read_csv(run / "train_log.csv")
    assert list(log.columns) == ["step", "lr", "train_loss", "val_loss[a]", "val_loss[b]", "tokens_per_s"]
    assert log["step"].iloc[0] == 0 and log["step"].iloc[-1] == 4
    typed = Manifest.read(run)
    manifest = typed.to_dict()
    # schema 2: the default view is named once, under values.default_view (no top-level duplicate)
    assert (
        manifest["status"] == "complete"
        and typed.default_view == DEFAULT_VIEW
        and "default_view" not in manifest
    )
    assert manifest["schema_version"] == 2 and manifest["values"]["default_view"]["view"] == DEFAULT_VIEW
    assert manifest["corpus"]["identical_to_validation"] == ["doc5"]
    assert manifest["corpus"]["fingerprint"] and manifest["versions"]["torch"]
    assert (run / "val_sets" / "a.jsonl").read_text().count("\n") == 3
    assert (run / "checkpoints" / "model.safetensors").is_file()

    with pytest.warns(UserWarning):
        again = train_and_value(_cfg(tmp_path, "r2", exclude_ids=("doc7",)))
    for name in ("doc_values", "example_values", "step_values"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(run / f"{name}.parquet"),
            pd.read_parquet(again / f"{name}.parquet"),
            check_exact=True,
        )


def test_config_precedence_and_errors(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('corpus = "builtin"\nsteps = 50\norder = 2\n[val]\nx = "x.jsonl"\n')
    cfg = build_config(toml, steps=7).resolved()
    assert cfg.steps == 7 and cfg.order == 2 and cfg.corpus == ["builtin"] and cfg.val == {"x": "x.jsonl"}
    assert cfg.n_layer == 2 and cfg.seq_len == 64  # from the cpu-tiny preset
    toml.write_text("stpes = 3\n")
    with pytest.raises(UserError, match="unknown config keys: stpes"):
        build_config(toml)
    with pytest.raises(UserError, match="--steps or --epochs"):
        RunConfig(val={"x": "x"}, steps=3, epochs=1.0).resolved()
    with pytest.raises(UserError, match="validation set"):
        RunConfig().resolved()
    assert RunConfig(val={"x": "x"}, epochs=2.0, batch_size=4).resolved().total_steps(10) == 5


def test_lr_schedule_warms_up_then_decays_to_min():
    from attribution.train.loop import lr_at

    cfg = RunConfig(val={"x": "x"}, lr=1.0, min_lr=0.1, warmup_steps=10).resolved()
    assert lr_at(5, cfg, 100) == pytest.approx(0.5)
    assert lr_at(10, cfg, 100) == pytest.approx(1.0)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    assert all(lr_at(s, cfg, 100) >= lr_at(s + 1, cfg, 100) for s in range(10, 100))


@pytest.mark.slow
def test_document_split_into_sequences_gets_the_sum_of_their_values(tmp_path):
    """Step 1 recomputed by hand with the engine: each document's value is the sum over its sequences."""
    import torch

    from attribution.engine.valuer import ValSet, Valuer
    from attribution.train.distributed import DistInfo
    from attribution.train.loop import (
        Sampler,
        build_model,
        build_optimizer,
        load_training,
        load_validation,
        lr_at,
    )

    write_corpus(tmp_path, n_docs=6)  # few documents, several sequences each: one batch holds repeats
    write_val(tmp_path, "a", 3)
    write_val(tmp_path, "b", 2, seed=5)
    # float64 throughout: the run and the recomputation sum in different orders, and a float32
    # tolerance would then depend on the machine's summation order (issue 16).
    cfg = _cfg(tmp_path, "one", batch_size=8, dtype="float64").resolved()
    cfg.steps = 1
    run = train_and_value(cfg)

    val = load_validation(cfg)
    data = load_training(cfg, val, tmp_path / "cache", DistInfo())
    batch = Sampler(data.train_seqs, cfg.seed).take(0, cfg.batch_size)
    docs_in_batch = data.store_row_of_seq[batch]
    assert len(set(docs_in_batch)) < len(batch)  # some document has several sequences in this step
    model = build_model(cfg, "cpu", "float64")
    opt = build_optimizer(model, cfg)
    valuer = Valuer(
        model,
        {n: ValSet(torch.from_numpy(v.ids), torch.from_numpy(v.mask)) for n, v in val.items()},
        optimizer_aware=cfg.adam_aware,  # the run's default: AdamW-aware values
    )
    valuer.forward_backward(
        torch.from_numpy(np.asarray(data.seqset.ids[batch], dtype=np.int64)),
        torch.from_numpy(np.asarray(data.seqset.mask[batch], dtype=np.int64)),
    )
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), cfg.clip)
    lr = lr_at(1, cfg, 1)
    sv = valuer.values(lr, grad_scale=float(torch.clamp(cfg.clip / (norm + 1e-6), max=1.0)), optimizer=opt)
    opt.zero_grad()

    dv = pd.read_parquet(run / "doc_values.parquet").set_index(["doc_id", "val_set"])
    doc_ids = data.docs["doc_id"].to_numpy()
    for name in ("a", "b"):
        expected = pd.Series(sv.per_set[name]).groupby(doc_ids[docs_in_batch]).sum()
        for doc_id, value in expected.items():
            # float32 model; the run scored per example (another summation order), hence rel 1e-4
            assert dv.loc[(doc_id, name), "value"] == pytest.approx(value, rel=1e-9, abs=1e-15)
            assert dv.loc[(doc_id, name), "n_seen"] == int((doc_ids[docs_in_batch] == doc_id).sum())


def test_run_prints_the_memory_model_once_after_the_first_step(tmp_path, capsys):
    write_corpus(tmp_path)
    write_val(tmp_path, "a", 3)
    write_val(tmp_path, "b", 2, seed=5)
    cfg = _cfg(tmp_path, "r", order=2)
    cfg.progress, cfg.steps = True, 2
    train_and_value(cfg)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "valued step holds about" in x]
    assert len(lines) == 1
    assert "validation side" in lines[0] and "order-2 pending side" in lines[0] and "MiB" in lines[0]


def test_in_run_cosine_is_on_only_when_the_run_has_no_checkpoint_view():
    """The in-run cosine views' norms are a fallback: computed when there is no checkpoint view (whose
    cosines the default view reads), or when asked; a run recorded before the switch reads as having them."""
    base = {"val": {"x": "x.jsonl"}, "preset": "test-micro"}
    assert RunConfig(**base).resolved().in_run_cosine is False
    assert RunConfig(**base, checkpoint_view=False).resolved().in_run_cosine is True
    assert RunConfig(**base, keep_every=0).resolved().in_run_cosine is True  # no chain: no checkpoint view
    assert RunConfig(**base, in_run_cosine=True).resolved().in_run_cosine is True
    assert RunConfig(**base, checkpoint_view=False, in_run_cosine=False).resolved().in_run_cosine is False
    recorded = RunConfig(**base).resolved().to_json()
    assert RunConfig.of_run(recorded) == RunConfig(**base).resolved()
    older = {k: v for k, v in recorded.items() if k != "in_run_cosine"} | {"a_key_of_older_code": 1}
    old = RunConfig.of_run(older)
    assert old.in_run_cosine is True and old.betas == tuple(recorded["betas"])


def test_in_run_cosine_adds_value_cosine_and_changes_no_value(tmp_path):
    """With and without the norms the values are the same numbers; only `value_cosine` (and the views
    that read it) comes and goes. A run is resumed only as it was started."""
    from attribution.values import RunValues

    write_corpus(tmp_path)
    write_val(tmp_path, "a", 3)
    write_val(tmp_path, "b", 2, seed=5)
    lean = train_and_value(_cfg(tmp_path, "lean"))
    full = train_and_value(_cfg(tmp_path, "full", in_run_cosine=True))
    read = {
        name: pd.read_parquet(run / "example_values.parquet")
        for name, run in (("lean", lean), ("full", full))
    }
    assert read["lean"]["value_cosine"].isna().all() and read["full"]["value_cosine"].notna().all()
    for col in ("value", "value_normalized"):
        np.testing.assert_array_equal(read["lean"][col].to_numpy(), read["full"][col].to_numpy())
    assert "standout_cosine" in RunValues.read(full).available_views()
    assert "standout_cosine" not in RunValues.read(lean).available_views()
    with pytest.raises(UserError, match="started without in-run cosines"):
        train_and_value(_cfg(tmp_path, "lean", resume=True, in_run_cosine=True))
