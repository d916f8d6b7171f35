"""The demo's closing lines rank each rewrite's original by the default view and by raw value."""

from __future__ import annotations

import json

import numpy as np
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
    docs = ["generic", "orig", "other"]
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(3, 5)) * 0.1 + np.array(
        [[5.0], [0.0], [2.0]]
    )  # generic and other: as for every text
    rows = [(d, "rewrites", "v1", v) for d, v in zip(docs, [5.0, 1.0, 2.0], strict=True)]
    rows += [(d, "reference", f"r{j}", ref[i, j]) for i, d in enumerate(docs) for j in range(5)]
    ev = pd.DataFrame(rows, columns=["doc_id", "val_set", "val_id", "value"])
    ev["value_cosine"] = ev["value"] / 10
    ev.to_parquet(tmp_path / "example_values.parquet")
    # raw value: the generally helpful document wins for v1; the default view (the standout z against the
    # reference set, computed on read) puts the original first: 1.0 is ~10 sd above its reference values
    (row,) = target_ranks(tmp_path)
    assert (row["rank"], row["rank_value"], row["of"], row["target"]) == (1, 3, 3, "orig")
