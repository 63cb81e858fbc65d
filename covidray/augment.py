"""GPU-friendly training augmentation with kornia: runs on whatever device the batch is on.

The paper's set (Zebin et al. 2020, Keras ``ImageDataGenerator``): rotation up to +-10 degrees,
width/height shift up to 10 %, horizontal flip; plus mild intensity changes (random gamma and
contrast around each image's mean), each applied with probability ``p_intensity``.

Horizontal flip is on by default because the paper used it, but it is anatomically wrong for
chest X-rays: it moves the heart to the right side (situs inversus looks). Set ``hflip=False``
to keep anatomy plausible.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn

from .config import AugmentConfig

__all__ = ["AugmentConfig", "Clamp01", "build_augmentation"]


class Clamp01(nn.Module):
    """Clamp to [0, 1] (interpolation can overshoot by rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


def build_augmentation(cfg: AugmentConfig | None = None) -> nn.Sequential:
    """An ``nn.Sequential`` of kornia modules for ``B x C x H x W`` float tensors in [0, 1].

    Parameters are drawn per sample from torch's global RNG on the batch's device (seed with
    ``torch.manual_seed`` for reproducibility). Output: same shape, device and dtype, in
    [0, 1]. Call it in training only (it augments in both train and eval mode).
    """
    cfg = cfg or AugmentConfig()
    layers: list[nn.Module] = []
    if cfg.rotation_deg > 0 or cfg.shift > 0:
        layers.append(
            K.RandomAffine(
                degrees=cfg.rotation_deg,
                translate=(cfg.shift, cfg.shift) if cfg.shift > 0 else None,
                padding_mode=cfg.padding_mode,
                p=1.0,  # as Keras: every image gets a random rotation/shift from the range
            )
        )
    if cfg.hflip:
        layers.append(K.RandomHorizontalFlip(p=0.5))
    if cfg.gamma is not None and cfg.p_intensity > 0:
        layers.append(K.RandomGamma(gamma=cfg.gamma, p=cfg.p_intensity))
    if cfg.contrast is not None and cfg.p_intensity > 0:
        # ColorJitter's contrast blends with the image mean (torchvision/PIL convention);
        # K.RandomContrast would only scale intensities, i.e. change brightness.
        layers.append(
            K.ColorJitter(
                brightness=0.0, contrast=cfg.contrast, saturation=0.0, hue=0.0, p=cfg.p_intensity
            )
        )
    layers.append(Clamp01())
    return nn.Sequential(*layers)
