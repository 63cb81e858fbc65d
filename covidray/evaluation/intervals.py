"""Uncertainty of the figures: Wilson score intervals for rates, bootstrap intervals for the
rest (ECE, AUROC). Small samples (23 COVID-19 test films) make both wide; they are printed."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval (95 % by default) of a rate ``successes / n``; None for n = 0."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(
    statistic: Callable[..., float],
    *arrays: np.ndarray,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    clusters: np.ndarray | None = None,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``statistic(*arrays)`` over resampled rows; None for
    fewer than two rows (or clusters). With ``clusters`` (one id per row, e.g. the patient),
    whole clusters are resampled: a patient's films stay together, as they are not
    independent."""
    n = len(arrays[0])
    members: list[np.ndarray] = []
    if clusters is not None and n:
        _, inverse = np.unique(np.asarray(clusters).astype(str), return_inverse=True)
        members = [np.flatnonzero(inverse == c) for c in range(int(inverse.max()) + 1)]
    if n < 2 or (clusters is not None and len(members) < 2):
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        if clusters is None:
            idx = rng.integers(0, n, n)
        else:
            idx = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        try:
            values.append(statistic(*(np.asarray(a)[idx] for a in arrays)))
        except ValueError:  # a resample without one of the classes a statistic needs
            continue
    if not values:
        return None
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve for scores where positives should be higher (ties count half)."""
    neg, pos = np.asarray(negatives, float), np.asarray(positives, float)
    if not len(neg) or not len(pos):
        raise ValueError("AUROC needs both classes")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
