"""Royalty-style contribution reports per source and per rights holder (`attribution report`).

`build_report` and `ReportResult` are imported lazily, so that importing the CLI module (for
`attribution --help`) does not pull in pandas, matplotlib and the analysis layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attribution.report.royalty import RULES, get_rule

if TYPE_CHECKING:
    from attribution.report.build import ReportResult, build_report

__all__ = ["RULES", "ReportResult", "build_report", "get_rule"]


def __getattr__(name: str):
    if name in ("build_report", "ReportResult"):
        from attribution.report import build

        return getattr(build, name)
    raise AttributeError(name)
