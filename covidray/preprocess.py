"""From a decoded film to the model's input.

Decoded images are ``H×W`` floats in [0, 1] (see ``decode.py``). Ingest stores each film
resized to a fixed shorter side (:func:`resize_shorter_side`, Lanczos) at 8 bits; the model
then sees the whole film squashed to ``size×size`` (:func:`to_model_input`), with intensity
scaling only; normalization to the backbone's mean and std happens inside the model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DEFAULT_SIZE = 224


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a float H×W image (Lanczos, in float) so its shorter side is ``size``."""
    h, w = image.shape
    if min(h, w) == size:
        return image
    scale = size / min(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image, mode="F").resize(new, Image.Resampling.LANCZOS))


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
