"""Where one document ranks among others by a score: the copyright experiment's and the demo's measure.

Tie rule (one definition for every reader): rank 1 = the highest score; documents with equal scores
share the average of the ranks they occupy, so a tie neither flatters nor penalises the document
asked about (three documents tied for the top all get rank 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rank_of(scores: np.ndarray, target: int) -> float:
    """1-based rank of `scores[target]` when sorted high to low; ties share the average rank."""
    s = np.asarray(scores, dtype=np.float64)
    t = s[target]
    higher = int(np.sum(s > t))
    ties = int(np.sum(s == t)) - 1
    return 1.0 + higher + ties / 2.0


def rank_and_control(scores: np.ndarray, target: int, others: Sequence[int]) -> tuple[float, float]:
    """`rank_of` the target, and the control: the mean rank of `others` (the other originals) by the
    same scores, about (n + 1) / 2 for a score that does not simply favour documents like them; NaN
    without others."""
    control = float(np.mean([rank_of(scores, o) for o in others])) if len(others) else float("nan")
    return rank_of(scores, target), control
