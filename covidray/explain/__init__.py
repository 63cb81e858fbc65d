"""Explanations: Grad-CAM in the prediction's forward pass, and summaries of the maps."""

from __future__ import annotations

from .gradcam import CamResult, GradCAM, normalize_cam
from .stats import border_mask, cam_summary, colormap_lut, overlay

__all__ = [
    "CamResult",
    "GradCAM",
    "border_mask",
    "cam_summary",
    "colormap_lut",
    "normalize_cam",
    "overlay",
]
