"""Moved to `attribution.values.views`; this name stays only while the importers move."""

from attribution.values.views import *  # noqa: F403
from attribution.values.views import DEFAULT_VIEW, KEYS, VIEWS, View, available, column_of, compute  # noqa: F401
