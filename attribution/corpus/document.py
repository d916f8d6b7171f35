"""The unit that gets valued: one training document and who owns it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    `doc_id` is stable across runs (the given id, or derived from content and position), so values
    from different runs, indexes and reports can be joined on it.
    """

    doc_id: str
    text: str
    source: str
    owner: str = "unknown"
    license: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
