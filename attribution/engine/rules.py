"""Per-module rules (Opacus style): how a module's per-sample parameter gradients factor.

Every per-sample gradient of a parameter is written as a sum over tokens of outer products
`row_t (x) col_t` in the *parameter's own orientation*: canonical shape `(P0, P1)` is the
parameter's shape (a 1-D parameter of size d is `(d, 1)` with no column factor). A row factor may
be an *index* (an embedding's token id, i.e. an implicit one-hot of size V that is never built).
A parameter used by several modules (GPT-2's tied `wte`/`lm_head`) gets one `Use` per module
call; its per-sample gradient is the sum, so inner products include the cross terms.

One small rule per module type, looked up by type; a trainable parameter that no rule covers
raises `UnsupportedModuleError` naming the module and the parameter, never a silent skip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from attribution.errors import UserError


class UnsupportedModuleError(UserError):
    """A module with trainable parameters that the engine has no per-sample rule for."""


@dataclass
class Use:
    """One module call's contribution to one parameter, for a batch of n samples.

    row: `[n, T, P0]` dense, or `[n, T]` int64 token ids when `row_index` (one-hot rows of size P0).
    col: `[n, T, P1]` dense, or None when P1 == 1 (then the contribution is `sum_t row_t`; the rules
    give such rows already summed, `[n, 1, P0]`: see `token_sum`).
    """

    row: torch.Tensor
    col: torch.Tensor | None
    row_index: bool = False

    @property
    def n(self) -> int:
        return self.row.shape[0]

    @property
    def tokens(self) -> int:
        return self.row.shape[1]

    def samples(self, index: slice | torch.Tensor) -> Use:
        """The use restricted to some of its samples (a slice or an index tensor)."""
        return Use(self.row[index], None if self.col is None else self.col[index], self.row_index)

    def scaled(self, w: float | torch.Tensor) -> Use:
        """The same use times a scalar or a per-sample weight `[n]` (applied to the dense factor)."""
        if isinstance(w, torch.Tensor) and w.dim() == 1:
            w = w.view(-1, 1, 1)
        if self.col is not None:
            return Use(self.row, self.col * w, self.row_index)
        return Use(self.row * w, None, self.row_index)

    def select(self, idx: torch.Tensor | slice) -> Use:
        """The samples `idx` only."""
        return Use(self.row[idx], None if self.col is None else self.col[idx], self.row_index)


def canonical_shape(param: nn.Parameter) -> tuple[int, int]:
    """`(P0, P1)`: the parameter's shape, 1-D parameters as a column."""
    if param.dim() == 1:
        return (param.shape[0], 1)
    if param.dim() == 2:
        return (param.shape[0], param.shape[1])
    raise UnsupportedModuleError(f"parameter of shape {tuple(param.shape)} is not 1-D or 2-D")


def _as_btd(x: torch.Tensor, n: int) -> torch.Tensor:
    """Reshape a module input/output to `[n, T, d]` (2-D inputs become T=1)."""
    if x.shape[0] != n:
        raise UnsupportedModuleError(
            f"a module output has batch size {x.shape[0]}, expected {n}: per-sample gradients would mix samples"
        )
    return x.reshape(n, -1, x.shape[-1])


# A rule: (module, input, output_grad, n) -> [(param, Use)]. `inp` is the module's first positional
# input (detached), `gout` the gradient of the per-sample losses w.r.t. the module's output.
Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], list[tuple[nn.Parameter, Use]]]
RULES: dict[type, Rule] = {}


def register_rule(module_type: type) -> Callable[[Rule], Rule]:
    """Decorator: the rule for `module_type` (exact type or subclasses, nearest first)."""

    def deco(fn: Rule) -> Rule:
        RULES[module_type] = fn
        return fn

    return deco


def token_sum(row: torch.Tensor) -> torch.Tensor:
    """`[n, T, P]` -> `[n, 1, P]`, in float32 at least: the row of a 1-D parameter's use.

    Why at capture: a 1-D parameter's per-sample gradient is `sum_t row_t`, and every strategy sums over
    tokens first. Summed once here, the capture holds `n x P` numbers instead of `n x T x P`, the rescaling
    to per-sample losses touches those only (and scales the 2-D weight's smaller factor instead of the
    output gradient its bias shared), and the sum is read while the gradient is fresh in cache.
    """
    return row.sum(1, keepdim=True, dtype=torch.promote_types(row.dtype, torch.float32))


def _bias_use(module: nn.Module, b: torch.Tensor) -> list[tuple[nn.Parameter, Use]]:
    bias = getattr(module, "bias", None)
    if bias is not None and bias.requires_grad:
        return [(bias, Use(token_sum(b), None))]
    return []


@register_rule(nn.Linear)
def _linear(
    module: nn.Linear, inp: torch.Tensor, gout: torch.Tensor, n: int
) -> list[tuple[nn.Parameter, Use]]:
    a, b = _as_btd(inp, n), _as_btd(gout, n)
    out = [(module.weight, Use(b, a))] if module.weight.requires_grad else []  # weight is [out, in]
    return out + _bias_use(module, b)


def _conv1d(
    module: nn.Module, inp: torch.Tensor, gout: torch.Tensor, n: int
) -> list[tuple[nn.Parameter, Use]]:
    a, b = _as_btd(inp, n), _as_btd(gout, n)
    out = [(module.weight, Use(a, b))] if module.weight.requires_grad else []  # HF Conv1D weight is [in, out]
    return out + _bias_use(module, b)


@register_rule(nn.LayerNorm)
def _layer_norm(
    module: nn.LayerNorm, inp: torch.Tensor, gout: torch.Tensor, n: int
) -> list[tuple[nn.Parameter, Use]]:
    if len(module.normalized_shape) != 1:
        raise UnsupportedModuleError(
            f"LayerNorm over {module.normalized_shape}: only 1-D normalized_shape is supported"
        )
    b = _as_btd(gout, n)
    out = []
    if module.weight is not None and module.weight.requires_grad:
        x = _as_btd(inp, n).to(b.dtype if b.dtype == torch.float64 else torch.float32)
        # the normalized input from the forward's own kernel, the xhat the weight multiplied (on this
        # build the forward's output is `xhat * weight + bias` bit for bit), at a third of the cost of
        # `var_mean` and two more passes
        xhat = torch.native_layer_norm(x, module.normalized_shape, None, None, module.eps)[0]
        out.append((module.weight, Use(token_sum(b * xhat.to(b.dtype)), None)))
    return out + _bias_use(module, b)


@register_rule(nn.Embedding)
def _embedding(
    module: nn.Embedding, inp: torch.Tensor, gout: torch.Tensor, n: int
) -> list[tuple[nn.Parameter, Use]]:
    if not module.weight.requires_grad:
        return []
    if module.max_norm is not None or module.sparse:
        raise UnsupportedModuleError("nn.Embedding with max_norm or sparse=True is not supported")
    ids = inp.reshape(n, -1).long()
    b = _as_btd(gout, n)
    if module.padding_idx is not None:  # that row never receives gradient
        b = b * (ids != module.padding_idx).unsqueeze(-1).to(b.dtype)
    return [(module.weight, Use(ids, b, row_index=True))]


try:  # transformers' Conv1D (GPT-2) is optional for the engine
    from transformers.pytorch_utils import Conv1D as _HFConv1D

    RULES[_HFConv1D] = _conv1d
except ImportError:  # pragma: no cover
    pass


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for this module's type (exact type first, then the nearest base class)."""
    for klass in type(module).__mro__:
        if klass in RULES:
            return RULES[klass]
    return None


def supported_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules whose parameters the engine values; raises on trainable parameters with no rule."""
    found = []
    for name, module in model.named_modules():
        own = [(pname, p) for pname, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if rule_for(module) is None:
            pnames = ", ".join(f"{name}.{pn}" if name else pn for pn, _ in own)
            raise UnsupportedModuleError(
                f"module {name or '<root>'} ({type(module).__name__}) has trainable parameters ({pnames}) but the "
                "engine has no per-sample rule for this module type; freeze them or register a rule "
                "with attribution.engine.rules.register_rule"
            )
        found.append((name, module))
    return found


def trainable_params(model: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    """Trainable parameters by identity (tied parameters appear once, under their first name)."""
    out: dict[int, tuple[str, nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in out:
            out[id(p)] = (name, p)
    return out
