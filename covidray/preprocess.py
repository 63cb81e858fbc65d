"""The one preprocessing step between a decoded image and the model: a square resize.

Decoded images are ``1×H×W`` floats in [0, 1] (see ``decode.py``). The model sees the whole
film squashed to ``size×size`` (the paper's 224), with intensity scaling only; normalization
to the backbone's mean and std happens inside the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_SIZE = 224


def to_model_input(image: torch.Tensor, size: int = DEFAULT_SIZE) -> torch.Tensor:
    """``1×H×W`` (or ``B×1×H×W``) in [0, 1] → ``…×1×size×size`` float32, antialiased bilinear."""
    batched = image.dim() == 4
    x = image if batched else image.unsqueeze(0)
    x = x.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        x = x.clamp_(0.0, 1.0)
    return x if batched else x.squeeze(0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Compact cache format for preprocessed images (4× smaller than float32)."""
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0)
