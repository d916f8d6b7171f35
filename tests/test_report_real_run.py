"""`attribution report` end to end on a real tiny run (real GPT-2 training with values, real MiniLM)."""

from __future__ import annotations

import pandas as pd
import pytest
from click.testing import CliRunner
from report_fixtures import make_real_run
from test_report import assert_outputs_agree, md_rows, read_csv

from attribution.cli import main
from attribution.values import Manifest


@pytest.mark.slow
def test_report_on_a_real_run(tmp_path):
    run = make_real_run(tmp_path)
    out = tmp_path / "report"
    res = CliRunner().invoke(
        main,
        [
            "report",
            str(run),
            "--out",
            str(out),
            "--pool",
            "2500",
            "--currency",
            "EUR",
            "--by",
            "owner",
            "--bootstrap",
            "100",
        ],
    )
    assert res.exit_code == 0, res.output
    assert_outputs_agree(out, "2500", "EUR")

    # Group values are sums of the run's own document values.
    dv = pd.read_parquet(run / "doc_values.parquet")
    owners = {r["owner"]: float(r["value"]) for r in read_csv(out / "owners.csv")}
    exp = dv.groupby("owner")["value"].sum()
    assert (
        set(owners)
        == set(exp.index)
        == {"Daily Ledger Ltd", "Metro Press", '<img src=x onerror="window.__pwned=1">'}
    )
    for k, v in exp.items():
        assert owners[k] == pytest.approx(v, rel=1e-5, abs=1e-12)

    md = (out / "report.md").read_text(encoding="utf-8")
    page = (out / "report.html").read_text(encoding="utf-8")
    # Summary facts come from the run's manifest.
    manifest = Manifest.read(run).to_dict()
    assert manifest["corpus"]["fingerprint"] in md
    assert (
        "**Training steps:** `6`" in md
        and "first-order Taylor" in md
        and "optimizer-aware (Adam-preconditioned values)" in md
    )
    # --by owner leads with the owner table; CIs come from the step bootstrap.
    assert md.index("### Per owner") < md.index("### Per source")
    assert "100 bootstrap replicates over the 6 training steps" in md
    # Every validation example has an evidence table with MiniLM similarities in [-1, 1].
    for vid in ("copy-3", "unseen-a", "unseen-b"):
        assert f"`{vid}`" in md
    rows = [r for r in md_rows(md) if len(r) == 9 and r[0].isdigit()]  # evidence tables: rank first
    assert len(rows) == 3 * 5
    sims = [float(r[7]) for r in rows]
    assert all(-1 <= x <= 1 for x in sims) and len(set(sims)) > 1
    assert "<script" not in page.lower()
