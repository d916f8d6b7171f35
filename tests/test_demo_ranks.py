"""The demo's closing lines rank each rewrite's original by the default view and by raw value."""

from __future__ import annotations

import json

import pandas as pd

from attribution.workflows.demo import target_ranks


def test_target_ranks_use_the_attribution_column_and_report_raw_value_too(tmp_path):
    (tmp_path / "val_sets").mkdir()
    (tmp_path / "val_sets" / "rewrites.jsonl").write_text(
        json.dumps({"id": "v1", "text": "x", "meta": {"target_id": "orig", "variant": "paraphrase"}}) + "\n"
    )
    pd.DataFrame(
        {"doc_id": ["generic", "orig", "other"], "source": "s", "owner": "o", "n_tokens": 10}
    ).to_parquet(tmp_path / "docs.parquet")
    pd.DataFrame(
        {
            "doc_id": ["generic", "orig", "other"] * 2,
            "val_set": ["rewrites"] * 3 + ["news"] * 3,
            "val_id": ["v1"] * 3 + ["n1"] * 3,
            # raw value: the generally helpful document wins for v1 (it helps the news text just as much)
            "value": [5.0, 1.0, 2.0, 5.0, -2.0, 2.0],
        }
    ).to_parquet(tmp_path / "example_values.parquet")
    # the default view (contrast_per_token, computed on read): v1 minus the other text, per token:
    # generic 0, orig 0.3, other 0, so the original wins
    (row,) = target_ranks(tmp_path)
    assert (row["rank"], row["rank_value"], row["of"], row["target"]) == (1, 3, 3, "orig")
