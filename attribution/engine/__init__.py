"""The valuation engine: exact per-sample gradient inner products and In-Run Shapley values.

Public API (see docs/architecture.md): `grad_dot_products`, `grad_norms`, `step_values`,
`plan_layers`, `Valuer`, `ValSet`, `StepValues`, `LanguageModelingTask`. Layer rules
(`register_rule`) and scoring strategies (`register_strategy`, one module each under `strategies/`) are
registries looked up by type and by name. Brute-force references for tests live in `attribution.engine.exact`.
"""

from .planner import Plan
from .rules import UnsupportedModuleError, register_rule
from .shapley import grad_dot_products, grad_norms, plan_layers, step_values
from .strategies import Strategy, register_strategy, unregister_strategy
from .task import LanguageModelingTask, Task
from .valuer import StepValues, ValSet, Valuer

__all__ = [
    "LanguageModelingTask",
    "Plan",
    "StepValues",
    "Strategy",
    "Task",
    "UnsupportedModuleError",
    "ValSet",
    "Valuer",
    "grad_dot_products",
    "grad_norms",
    "plan_layers",
    "register_rule",
    "register_strategy",
    "step_values",
    "unregister_strategy",
]
