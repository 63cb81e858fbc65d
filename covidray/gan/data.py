"""GAN data: the two domains (TRAIN split only), decoded once, and unpaired sampling.

A domain is the real (non-synthetic) TRAIN rows of one label that pass a
:class:`~covidray.gan.config.DomainFilter`. Val and test rows never reach the GAN, so its
outputs cannot leak evaluation images into training.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from ..dataset import load_images, load_rows, shard_indices
from .config import DomainFilter


def domain_rows(rows: pd.DataFrame, label: str, flt: DomainFilter) -> pd.DataFrame:
    """Real TRAIN rows of ``label`` passing ``flt``, sorted by image_id (order-independent)."""
    real = ~rows["synthetic"].fillna(False).astype(bool)
    chosen = rows[(rows["split"] == "train") & (rows["label"] == label) & real]
    chosen = chosen[flt.mask(chosen)]
    return chosen.sort_values("image_id").reset_index(drop=True)


def load_domains(
    data: str, a: tuple[str, DomainFilter], b: tuple[str, DomainFilter]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(rows_a, rows_b)`` of the dataset ``data``; raises when a domain is empty."""
    rows = load_rows(data)
    out = []
    for label, flt in (a, b):
        chosen = domain_rows(rows, label, flt)
        if chosen.empty:
            raise ValueError(f"{data}: no TRAIN rows of {label!r} pass the filter {flt}")
        out.append(chosen)
    return out[0], out[1]


def to_gan(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [-1, 1]."""
    return x_u8.float().div_(127.5).sub_(1.0)


def from_gan(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] → float [0, 1]."""
    return x.float().add(1.0).mul_(0.5).clamp_(0.0, 1.0)


def load_size(size: int, jitter: float) -> int:
    """Side the images are cached at before random crops of ``size``."""
    return size + int(round(size * jitter))


def worker_shard(n: int, rank: int, world: int, seed: int) -> np.ndarray:
    """This worker's rows of a domain; every row everywhere when there are fewer than workers."""
    return np.arange(n) if n < world else shard_indices(n, rank, world, seed)


class DomainCache:
    """One domain's images on one worker, decoded once at ``load_size`` as uint8."""

    def __init__(self, uris: list[str], size: int, jitter: float = 0.0) -> None:
        self.size = size
        self.images = load_images(uris, load_size(size, jitter))

    def __len__(self) -> int:
        return len(self.images)

    def batch(
        self, idx: torch.Tensor, generator: torch.Generator | None, hflip: bool = False
    ) -> torch.Tensor:
        """Images ``idx`` in [-1, 1], each randomly cropped to ``size`` (centre without rng)."""
        x = self.images[idx]
        big = x.shape[-1]
        if big > self.size:
            if generator is None:
                offs = [((big - self.size) // 2,) * 2] * len(idx)
            else:
                offs = torch.randint(0, big - self.size + 1, (len(idx), 2), generator=generator)
                offs = offs.tolist()
            x = torch.stack(
                [
                    img[:, i : i + self.size, j : j + self.size]
                    for img, (i, j) in zip(x, offs, strict=True)
                ]
            )
        x = to_gan(x)
        if hflip and generator is not None:
            flip = torch.rand(len(x), generator=generator) < 0.5
            x[flip] = x[flip].flip(-1)
        return x


class UnpairedSampler:
    """Per-epoch (A, B) index batches: A in a shuffled cycle, B drawn independently.

    Seeded by (seed, epoch, rank): an epoch's batches are the same after a resume.
    """

    def __init__(self, n_a: int, n_b: int, batch_size: int, steps: int, seed: int) -> None:
        self.n_a, self.n_b = n_a, n_b
        self.batch_size, self.steps, self.seed = batch_size, steps, seed

    def generator(self, epoch: int, rank: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 1009 + rank)

    def batches(
        self, epoch: int, rank: int, g: torch.Generator
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        need = self.steps * self.batch_size
        reps = math.ceil(need / self.n_a)
        a = torch.cat([torch.randperm(self.n_a, generator=g) for _ in range(reps)])[:need]
        b = torch.randint(self.n_b, (need,), generator=g)
        return list(zip(a.split(self.batch_size), b.split(self.batch_size), strict=True))


def steps_per_epoch(
    n_a: int, n_b: int, world: int, batch_size: int, epochs: int, iterations: int | None
) -> int:
    """Optimizer steps per epoch (on every worker): CycleGAN's ``max(|A|, |B|)`` images per
    epoch over all workers, or ``ceil(iterations / epochs)`` when iterations are given."""
    if iterations is not None:
        return max(1, math.ceil(iterations / epochs))
    return max(1, math.ceil(max(n_a, n_b) / (world * batch_size)))
