"""Royalty rules: how per-document values become shares of a pool.

Every rule works on *per-document* values and returns per-document shares; owner and source
shares are sums of their documents' shares. Because no rule ever looks at owner labels,
relabelling documents (for example splitting one owner into several "shell" owners) cannot change
what any document, and therefore any owner, is paid. That is the split-proof property the
reports promise, and it holds by construction for every rule registered here.

Rules accept 2-D arrays and an axis (the document axis) so the bootstrap can apply them to many
replicates at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

import numpy as np

from attribution.errors import UserError

DEFAULT_RULE = "positive-share"


@dataclass(frozen=True)
class Rule:
    """A named royalty rule with the sentence a report prints to explain it."""

    name: str
    description: str
    weights: Callable[..., np.ndarray]  # (values, axis) -> unnormalized weights; may overwrite values
    allows_negative: bool = False

    def shares(self, values: np.ndarray, axis: int = -1) -> np.ndarray:
        """Per-document shares along `axis` (the documents); replicates with nothing to share become NaN."""
        w = self.weights(np.array(values, dtype=np.float64, copy=True), axis)
        total = w.sum(axis=axis, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(total > 0, w / np.where(total > 0, total, 1.0), np.nan)
        return out


def _positive(v: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.maximum(v, 0.0, out=v)


def _signed(v: np.ndarray, axis: int = -1) -> np.ndarray:
    return v


def _clipped(v: np.ndarray, axis: int = -1, q: float = 0.99) -> np.ndarray:
    """Cap at the q-quantile of the positive values of each replicate (0 where none is positive)."""
    pos = np.where(v > 0, v, np.nan)
    has = np.any(v > 0, axis=axis, keepdims=True)
    with np.errstate(all="ignore"):
        cap = np.nanquantile(np.where(has, pos, 0.0), q, axis=axis, keepdims=True)
    return np.clip(v, 0.0, np.where(has, cap, 0.0), out=v)


RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule(
            "positive-share",
            "Each document's value is clipped at zero (documents that raised validation loss get "
            "nothing), then every document receives its clipped value divided by the sum of all "
            "clipped values. A group's share is the sum of its documents' shares.",
            _positive,
        ),
        Rule(
            "proportional-clipped",
            "Like positive-share, but each document's value is also capped at the 99th percentile "
            "of the positive document values before normalizing, so a handful of outlying "
            "documents cannot take most of the pool.",
            _clipped,
        ),
        Rule(
            "shapley-signed",
            "Shares are the raw (signed) document values divided by their total. Documents that "
            "raised validation loss get negative shares, which are netted against the other "
            "documents of the same group; a group's royalty can be negative. Requires a positive "
            "total value.",
            _signed,
            allows_negative=True,
        ),
    )
}


def get_rule(name: str) -> Rule:
    """The registered rule `name`, or a UserError that lists the valid names."""
    try:
        return RULES[name]
    except KeyError:
        raise UserError(f"unknown royalty rule {name!r}; choose one of: {', '.join(RULES)}") from None


def split_pool(shares: np.ndarray, pool: Decimal) -> list[Decimal]:
    """Royalties in cents that sum exactly to `pool` (largest-remainder rounding).

    Why: a licensing report whose rows do not add up to the pool invites disputes; rounding each
    row on its own can leave the total a few cents off.
    """
    cents_total = int((pool * 100).to_integral_value(rounding=ROUND_HALF_EVEN))
    raw = np.asarray(shares, dtype=np.float64) * cents_total
    base = np.floor(raw).astype(np.int64)
    rest = cents_total - int(base.sum())
    frac = raw - base
    # Deterministic tie-break: largest remainder first, then row order.
    order = np.lexsort((np.arange(len(frac)), -frac))
    base[order[: max(rest, 0)]] += 1
    return [Decimal(int(c)) / 100 for c in base]
