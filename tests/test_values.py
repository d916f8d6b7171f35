"""The run-directory contract (`attribution.values`): the typed manifest, the readers and read-time views."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from attribution.errors import BadInputError, UserError
from attribution.values import Manifest, RunDir, RunValues, rank_of
from attribution.values.manifest import CorpusInfo, Timings, TrainingInfo, ValSetInfo, ValuesInfo
from attribution.values.views import DEFAULT_VIEW, VIEWS, column_of, compute


def v1_manifest() -> dict:
    """A manifest as `_write_manifest` wrote it before schema 2: no schema_version, a top-level
    "default_view" naming a column next to values.default_view."""
    return {
        "status": "complete",
        "config": {
            "corpus": ["builtin:400"],
            "steps": 80,
            "order": 1,
            "optimizer": "adamw",
            "seed": 0,
            "optimizer_aware": False,
            "preset": "cpu-tiny",
            "n_layer": 2,
            "seq_len": 64,
        },
        "config_sources": {"demo": True},
        "default_view": "value",
        "seed": 0,
        "corpus": {
            "specs": ["builtin:400"],
            "fingerprint": "abc123",
            "n_docs_total": 400,
            "n_docs_trained": 392,
            "n_sequences": 900,
            "excluded_ids": 8,
            "identical_to_validation": [],
        },
        "val_sets": {
            "rewrites": {
                "path": "runs/demo/inputs/rewrites.jsonl",
                "n_docs": 8,
                "n_sequences": 8,
                "per_example": True,
            }
        },
        "training": {
            "total_steps": 80,
            "device": "cpu",
            "dtype": "float32",
            "world_size": 1,
            "tokens_per_step": 2048,
            "order": 1,
            "optimizer": "adamw",
            "values": "sgd-proxy",
            "clip": "values are for the clipped step",
            "weight_decay_credit": "none",
        },
        "values": {
            "normalization": "rule",
            "stage_window": 100,
            "per_example_sets": {"rewrites": 8},
            "default_view": {"view": "contrast_per_token", "column": "attribution"},
            "views": {"value": {"column": "value", "meaning": "raw", "use": "accounting"}},
        },
        "final_val_loss": {"rewrites": 7.5},
        "timings": {"started": 1.0, "finished": 95.0, "train_seconds": 90.5, "tokens_per_s": 1810.0},
        "peak_rss_mb": 900.0,
        "versions": {"torch": "2.5"},
        "git_commit": "deadbee",
        "resumed_from": [],
    }


def test_manifest_round_trip(tmp_path):
    m = Manifest(
        status="running",
        config={"steps": 5, "seed": 3},
        seed=3,
        corpus=CorpusInfo(specs=["a.jsonl"], fingerprint="f" * 64, n_docs_total=10, excluded_ids=2),
        val_sets={"v": ValSetInfo(path="v.jsonl", n_docs=4, n_sequences=4, per_example=True)},
        training=TrainingInfo(total_steps=5, order=2, optimizer="adamw", values="adam-aware"),
        values=ValuesInfo(
            normalization="n", stage_window=2, per_example_sets={"v": 4}, default_view="contrast", views={}
        ),
        timings=Timings(started=1.5, resumed_at=[3.0]),
        versions={"python": "3.11"},
        git_commit="abc",
        resumed_from=[2],
        extra={"name": "kept"},
    )
    m.write(tmp_path)
    back = Manifest.read(tmp_path)
    assert back == m
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["schema_version"] == 2 and "default_view" not in raw and raw["name"] == "kept"
    assert raw["values"]["default_view"] == {"view": "contrast", "column": "attribution"}
    assert raw["timings"] == {"started": 1.5, "resumed_at": [3.0]}  # unset timings are left out
    assert back.default_view == "contrast" and back.order == 2 and back.optimizer_aware is True
    assert Manifest.from_dict(back.to_dict()).to_dict() == raw


def test_v1_manifest_still_loads_with_the_right_default_view(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(v1_manifest(), indent=2))
    m = Manifest.read(tmp_path)
    assert m.schema_version == 1
    assert m.default_view == "contrast_per_token"  # values.default_view, not the old top-level column name
    assert m.total_steps == 80 and m.order == 1 and m.optimizer_aware is False and m.seed == 0
    assert m.corpus.fingerprint == "abc123" and m.val_sets["rewrites"].n_docs == 8
    assert m.timings.train_seconds == 90.5 and m.git_commit == "deadbee"
    assert m.model() == {"preset": "cpu-tiny", "n_layer": 2, "seq_len": 64}
    # a v1 manifest without a values section: the old top-level key decides
    assert Manifest.from_dict({"default_view": "value"}).default_view == "value"
    assert Manifest.from_dict({"default_view": "view_cosine"}).default_view == "cosine"
    assert Manifest.from_dict({}).default_view == DEFAULT_VIEW


def test_is_complete_is_the_reuse_check():
    class Config:
        def __init__(self, steps):
            self.steps = steps

        def to_json(self):
            return {"steps": self.steps, "val": ("a", "b")}  # a tuple becomes a JSON list

    done = Manifest(status="complete", config={"steps": 4, "val": ["a", "b"]})
    assert done.is_complete(Config(4)) and not done.is_complete(Config(5))
    assert not Manifest(status="running", config={"steps": 4, "val": ["a", "b"]}).is_complete(Config(4))


def test_malformed_manifest_names_file_and_line(tmp_path):
    (tmp_path / "manifest.json").write_text('{\n  "status": "complete",\n  oops\n}')
    with pytest.raises(BadInputError) as err:
        Manifest.read(tmp_path)
    assert err.value.path.endswith("manifest.json") and err.value.line == 3
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BadInputError, match="expected a JSON object"):
        Manifest.read(tmp_path)
    with pytest.raises(UserError, match="missing"):
        Manifest.read(tmp_path / "nowhere")


def make_values_run(path):
    """docs, doc_values (two sets) and example_values with every raw accumulator."""
    path.mkdir()
    docs = pd.DataFrame(
        {
            "doc_id": ["a", "b", "c"],
            "source": ["s1", "s2", "s1"],
            "owner": ["o1", "o1", "o2"],
            "n_tokens": [10, 40, 25],
        }
    )
    docs.to_parquet(path / "docs.parquet")
    pd.DataFrame(
        {
            "doc_id": ["a", "b", "c"] * 2,
            "val_set": ["x"] * 3 + ["y"] * 3,
            "value": [0.5, -0.25, 2.0, 1.0, 0.125, -4.0],
            "n_seen": [1, 2, 3] * 2,
        }
    ).to_parquet(path / "doc_values.parquet")
    rng = np.random.default_rng(0)
    ev = pd.DataFrame(
        {
            "doc_id": ["a", "b", "c"] * 4,
            "val_set": ["x"] * 6 + ["y"] * 6,
            "val_id": ["x1"] * 3 + ["x2"] * 3 + ["y1"] * 3 + ["y2"] * 3,
        }
    )
    for col in ("value", "value_normalized", "value_cosine"):
        ev[col] = rng.normal(size=len(ev))
    ev.to_parquet(path / "example_values.parquet")
    # the checkpoint cosines live in their own table, rows in another order; readers join them by key
    ev["checkpoint_cosine"] = rng.uniform(-1, 1, size=len(ev))
    ev[["doc_id", "val_set", "val_id", "checkpoint_cosine"]][::-1].to_parquet(
        path / "checkpoint_values.parquet"
    )
    return path, docs, ev


def test_by_sums_the_raw_document_values(tmp_path):
    path, _, _ = make_values_run(tmp_path / "run")
    values = RunValues.read(path)
    by_source = values.by("source")
    assert by_source.to_dict() == {"s1": 0.5 + 1.0 + 2.0 - 4.0, "s2": -0.25 + 0.125}
    assert values.by("owner", "x").to_dict() == {"o1": 0.5 - 0.25, "o2": 2.0}
    totals = values.to_dataframe().set_index("doc_id")
    assert totals["value"].to_dict() == {"a": 1.5, "b": -0.125, "c": -2.0}
    assert totals["n_seen"].to_dict() == {"a": 1, "b": 2, "c": 3}
    with pytest.raises(UserError, match="unknown validation set"):
        values.to_dataframe("zzz")
    with pytest.raises(UserError, match="'source' or 'owner'"):
        values.by("license")


def test_view_matches_views_compute_on_the_same_frame(tmp_path):
    path, docs, ev = make_values_run(tmp_path / "run")
    values = RunValues.read(path)
    expected = compute(ev, docs[["doc_id", "n_tokens"]])
    for name in VIEWS:
        got = values.view(name)
        assert got.attrs["view"] == name
        assert np.array_equal(got["attribution"].to_numpy(), expected[column_of(name)].to_numpy()), name
        assert np.array_equal(got["value"].to_numpy(), ev["value"].to_numpy())  # raw value untouched
    default = values.view()
    assert default.attrs["view"] == DEFAULT_VIEW  # no manifest: the package's default
    assert np.array_equal(default["attribution"].to_numpy(), expected["attribution"].to_numpy())
    every = values.with_views()
    pd.testing.assert_frame_equal(every, expected)
    with pytest.raises(UserError, match="unknown view"):
        values.view("bogus")


def test_stored_views_of_old_runs_are_ignored_and_null_cosine_counts_as_absent(tmp_path):
    path, docs, ev = make_values_run(tmp_path / "run")
    ev = ev.drop(columns="checkpoint_cosine")  # an old run: no checkpoint cosines either
    (path / "checkpoint_values.parquet").unlink()
    old = ev.assign(value_cosine=np.nan, view_contrast=99.0, attribution=99.0)
    old.to_parquet(path / "example_values.parquet")
    values = RunValues.read(path)
    assert list(values.examples().columns) == ["doc_id", "val_set", "val_id", "value", "value_normalized"]
    assert "cosine" not in values.available_views()
    expected = compute(ev.drop(columns="value_cosine"), docs[["doc_id", "n_tokens"]], ["contrast"])
    assert np.array_equal(
        values.view("contrast")["attribution"].to_numpy(), expected["view_contrast"].to_numpy()
    )


def test_rundir_reads_val_sets_once_and_checks_required_files(tmp_path):
    rd = RunDir(tmp_path)
    with pytest.raises(UserError, match="missing manifest.json, docs.parquet, doc_values.parquet"):
        rd.require()
    (tmp_path / "val_sets").mkdir()
    (tmp_path / "val_sets" / "v.jsonl").write_text(
        json.dumps({"id": "a", "text": "one", "meta": {"target_id": "d"}})
        + "\n\n"
        + json.dumps({"text": "two"})
        + "\n"
    )
    (texts,) = rd.val_sets().values()
    assert [(t.id, t.text, t.meta) for t in texts] == [("a", "one", {"target_id": "d"}), ("v-3", "two", {})]
    (tmp_path / "val_sets" / "w.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(BadInputError, match=r"w.jsonl:1: expected an object with a 'text' field"):
        rd.val_sets()


def test_rank_of_ties_share_the_average_rank():
    assert rank_of(np.array([3.0, 1.0, 3.0, 3.0]), 0) == 2.0
    assert rank_of(np.array([3.0, 1.0, 2.0]), 1) == 3.0
