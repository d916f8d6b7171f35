"""The run-directory contract: the typed manifest, the files' readers, and the values with their views.

`attribution run` writes a run directory (`RunDir`); everything downstream reads it through this package:
`Manifest` (manifest.json), `RunDir` (every other file, the validation-set copies included) and
`RunValues` (raw values per document and example, attribution views computed at read time).
"""

from attribution.values.manifest import SCHEMA_VERSION, Manifest
from attribution.values.ranks import rank_and_control, rank_of
from attribution.values.results import RunValues
from attribution.values.rundir import RunDir, ValText, read_val_set
from attribution.values.views import DEFAULT_VIEW, VIEWS

__all__ = [
    "DEFAULT_VIEW",
    "SCHEMA_VERSION",
    "VIEWS",
    "Manifest",
    "RunDir",
    "RunValues",
    "ValText",
    "rank_and_control",
    "rank_of",
    "read_val_set",
]
