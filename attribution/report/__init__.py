"""Royalty-style contribution reports per source and per rights holder (`attribution report`)."""

from attribution.report.build import ReportResult, build_report
from attribution.report.royalty import RULES, get_rule

__all__ = ["RULES", "ReportResult", "build_report", "get_rule"]
