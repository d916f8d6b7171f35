"""Scoring strategies, looked up by name; every other module in this package registers one when imported.

Adding a strategy is adding one module here that calls `register_strategy` (see `registry`).
"""

import importlib
import pkgutil

from .registry import (
    CostInputs,
    Param,
    Strategy,
    dense_score,
    get_strategy,
    register_strategy,
    registered,
    unregister_strategy,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "CostInputs",
    "Param",
    "Strategy",
    "dense_score",
    "get_strategy",
    "register_strategy",
    "registered",
    "unregister_strategy",
]
