"""The demo's closing lines rank each rewrite's original by the default view and by raw value."""

from __future__ import annotations

import json

import pandas as pd

from attribution.train.demo import target_ranks


def test_target_ranks_use_the_attribution_column_and_report_raw_value_too(tmp_path):
    (tmp_path / "val_sets").mkdir()
    (tmp_path / "val_sets" / "rewrites.jsonl").write_text(
        json.dumps({"id": "v1", "text": "x", "meta": {"target_id": "orig", "variant": "paraphrase"}}) + "\n")
    pd.DataFrame({
        "doc_id": ["generic", "orig", "other"], "val_set": ["rewrites"] * 3, "val_id": ["v1"] * 3,
        "value": [5.0, 1.0, 2.0],           # raw value: the generally helpful document wins
        "attribution": [-1.0, 3.0, 0.5],    # the default view: the original wins
    }).to_parquet(tmp_path / "example_values.parquet")
    (row,) = target_ranks(tmp_path)
    assert (row["rank"], row["rank_value"], row["of"], row["target"]) == (1, 3, 3, "orig")
