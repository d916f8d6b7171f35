"""Owner maps: who holds the rights to which documents.

A corpus rarely says who owns each document, but a reviewer usually knows it per source ("everything
in `nyt` is The New York Times") or per id pattern ("`gh/psf/*` is the PSF"). An owner map records
that once, in `corpora/`, and every reader applies it, so values can be summed per rights holder.

Two file formats, same meaning:

TOML::

    [sources]                       # exact source name (or a glob) -> owner
    github = "Python Software Foundation"
    news = { owner = "Australian Broadcasting Corporation", license = "unknown" }

    [[ids]]                         # glob on doc_id -> owner (checked before sources)
    pattern = "books/hamlet/*"
    owner = "Folger Shakespeare Library"
    license = "CC-BY-NC-3.0"

CSV, with a header ``kind,pattern,owner,license`` (license may be empty)::

    kind,pattern,owner,license
    source,github,Python Software Foundation,PSF-2.0
    id,books/hamlet/*,Folger Shakespeare Library,

Rules are tried in file order, id rules first; the first match wins. A matching rule overrides the
owner (and the license, when the rule gives one) that the document itself carries.
"""

from __future__ import annotations

import csv
import fnmatch
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from attribution.errors import BadInputError, UserError


@dataclass(frozen=True)
class OwnerRule:
    """One line of an owner map: documents whose id or source matches `pattern` belong to `owner`."""

    kind: str  # "id" or "source"
    pattern: str
    owner: str
    license: str | None = None

    def matches(self, doc_id: str, source: str) -> bool:
        value = doc_id if self.kind == "id" else source
        return value == self.pattern or fnmatch.fnmatchcase(value, self.pattern)


@dataclass
class OwnerMap:
    """Ordered owner rules; `lookup` returns the first that matches (id rules before source rules)."""

    rules: list[OwnerRule] = field(default_factory=list)

    def lookup(self, doc_id: str, source: str) -> OwnerRule | None:
        for kind in ("id", "source"):
            for rule in self.rules:
                if rule.kind == kind and rule.matches(doc_id, source):
                    return rule
        return None


def _toml_rules(path: Path) -> list[OwnerRule]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(path, None, f"invalid owner map TOML: {exc}") from None
    rules: list[OwnerRule] = []
    for i, entry in enumerate(data.get("ids", []), 1):
        if not isinstance(entry, dict) or "pattern" not in entry or "owner" not in entry:
            raise BadInputError(path, None, f"[[ids]] entry {i} needs 'pattern' and 'owner'")
        rules.append(OwnerRule("id", str(entry["pattern"]), str(entry["owner"]), entry.get("license")))
    for name, value in data.get("sources", {}).items():
        if isinstance(value, str):
            rules.append(OwnerRule("source", name, value))
        elif isinstance(value, dict) and "owner" in value:
            rules.append(OwnerRule("source", name, str(value["owner"]), value.get("license")))
        else:
            raise BadInputError(path, None, f"[sources] {name!r} must be a string or {{owner = ...}}")
    unknown = set(data) - {"ids", "sources"}
    if unknown:
        raise BadInputError(path, None, f"unknown owner map section(s): {', '.join(sorted(unknown))}")
    return rules


def _csv_rules(path: Path) -> list[OwnerRule]:
    rules: list[OwnerRule] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"kind", "pattern", "owner"} - set(reader.fieldnames or [])
        if missing:
            raise BadInputError(path, 1, f"owner map CSV lacks column(s): {', '.join(sorted(missing))}")
        for row in reader:
            kind = (row["kind"] or "").strip()
            if kind not in ("id", "source"):
                raise BadInputError(path, reader.line_num, f"kind must be 'id' or 'source', got {kind!r}")
            rules.append(OwnerRule(kind, row["pattern"], row["owner"], (row.get("license") or None)))
    return rules


def load_owner_map(path: str | Path) -> OwnerMap:
    """Read an owner map from a `.toml` or `.csv` file (format in this module's docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: owner map not found")
    if path.suffix == ".toml":
        return OwnerMap(_toml_rules(path))
    if path.suffix == ".csv":
        return OwnerMap(_csv_rules(path))
    raise UserError(f"{path}: owner map must be .toml or .csv")
