"""Balanced sampling of a worker's training shard (see covidray.dataset for the rows and the
decode-once image cache).

Train rows are shuffled with the run's seed and dealt out ``rows[rank::world_size]``. Each
epoch a worker draws the same number of samples from its shard, with replacement and with
weights that balance classes (and sources within a class), from a generator seeded by
(seed, epoch, rank): an epoch's batches are the same whether or not the run was resumed.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

log = logging.getLogger(__name__)


def sample_weights(
    labels: np.ndarray, sources: np.ndarray, mode: str, source_power: float = 0.5
) -> np.ndarray:
    """Per-row sampling weights (summing to 1) over the whole train set.

    ``none``: uniform. ``class``: each class the same total mass. ``class_source``: each class
    the same mass, split among its sources proportionally to ``n_source ** (1 - source_power)``
    (1: every source of a class equal; 0: same as ``class``), uniform within a source.
    """
    n = len(labels)
    if mode == "none":
        return np.full(n, 1.0 / n)
    w = np.zeros(n)
    classes = np.unique(labels)
    for c in classes:
        in_class = labels == c
        if mode == "class":
            w[in_class] = 1.0 / in_class.sum()
            continue
        if mode != "class_source":
            raise ValueError(f"unknown balance mode {mode!r}")
        srcs, counts = np.unique(sources[in_class], return_counts=True)
        mass = counts.astype(float) ** (1.0 - source_power)
        mass /= mass.sum()
        for s, m, k in zip(srcs, mass, counts, strict=True):
            w[in_class & (sources == s)] = m / k
    return w / w.sum()


class EpochSampler:
    """Per-worker sampling of its shard: same count for every worker (DDP needs equal steps)."""

    def __init__(
        self, weights: np.ndarray, n_total: int, world_size: int, batch_size: int, seed: int
    ) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.batch_size = batch_size
        self.seed = seed
        per_worker = math.ceil(n_total / world_size)
        self.steps = max(1, round(per_worker / batch_size))

    def batches(self, epoch: int, rank: int) -> list[torch.Tensor]:
        """Index batches (into the shard) for ``epoch``: ``steps`` full batches."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 1009 + rank)
        idx = torch.multinomial(
            self.weights, self.steps * self.batch_size, replacement=True, generator=g
        )
        return list(idx.split(self.batch_size))
