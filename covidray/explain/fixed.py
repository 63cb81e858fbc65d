"""One class's Grad-CAM on a fixed scale per model: maps comparable between images.

:class:`~covidray.explain.gradcam.GradCAM` divides each map by its own maximum. That suits an
overlay (where did the model look in *this* film) but not a disease-progression timeline: a
faint map and a strong one both reach 1, so the "affected area" of one study is not comparable
with the next, and it changes meaning when the predicted label (the explained class) changes.
Here the map of one fixed class (COVID-19) is divided by a constant of the model instead: the
99th percentile of that class's raw map values over the model's validation split
(:func:`fit_cam_scale`; the model card's ``cam_covid_scale``), then clipped to [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gradcam import GradCAM

__all__ = ["CAM_SCALE_QUANTILE", "fit_cam_scale", "fixed_class_maps", "fixed_scale"]

CAM_SCALE_QUANTILE = 0.99


def fit_cam_scale(
    model: nn.Module,
    images_u8: Tensor,
    class_idx: int,
    *,
    quantile: float = CAM_SCALE_QUANTILE,
    batch_size: int = 32,
) -> float:
    """The ``quantile`` of the raw (un-normalised) Grad-CAM values of class ``class_idx`` over
    ``images_u8`` (``N×1×S×S`` uint8, e.g. the validation split from
    :func:`covidray.dataset.load_images`), at the target layer's resolution, on the model's
    device. Falls back to the maximum (then 1.0) if that quantile is 0."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must lie in (0, 1], got {quantile}")
    if len(images_u8) == 0:
        raise ValueError("no images to fit a CAM scale on")
    device = next(model.parameters()).device
    cam = GradCAM(model)
    values = []
    for start in range(0, len(images_u8), batch_size):
        x = images_u8[start : start + batch_size].to(device).float().div_(255.0)
        values.append(cam(x, class_idx=class_idx, upsample=False).raw.flatten().cpu().numpy())
    flat = np.concatenate(values).astype(np.float64)
    scale = float(np.quantile(flat, quantile))
    if scale <= 0.0:
        scale = float(flat.max())
    return scale if scale > 0.0 else 1.0


def fixed_scale(raw: Tensor, scale: float) -> Tensor:
    """Raw maps divided by the model's ``scale``, clipped to [0, 1]."""
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return (raw.float() / scale).clamp_(0.0, 1.0)


def fixed_class_maps(
    model: nn.Module, x: Tensor, class_idx: int, scale: float, threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM of class ``class_idx`` for the batch ``x`` (``B×1×S×S`` in [0, 1] on the
    model's device, as :meth:`covidray.predict.Predictor.prepare` gives it), on the fixed
    ``scale``: ``(maps, area)``, the maps ``(B, h, w)`` uint8 at the target layer's resolution
    and the affected area ``(B,)`` float32, the share of the map (upsampled to the input) at
    or above ``threshold``."""
    raw = GradCAM(model)(x, class_idx=class_idx, upsample=False).raw
    maps = fixed_scale(raw, scale)
    up = F.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
    area = (up[:, 0] >= threshold).flatten(1).float().mean(dim=1)
    u8 = (maps * 255.0).round().to(torch.uint8)
    return u8.cpu().numpy(), area.cpu().numpy().astype(np.float32)
