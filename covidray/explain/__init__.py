"""Explanations: Grad-CAM in the prediction's forward pass, and summaries of the maps."""

from __future__ import annotations

from .fixed import fit_cam_scale, fixed_class_maps, fixed_scale
from .gradcam import CamResult, GradCAM, normalize_cam
from .stats import border_mask, cam_summary, colormap_lut, overlay

__all__ = [
    "CamResult",
    "GradCAM",
    "border_mask",
    "cam_summary",
    "colormap_lut",
    "fit_cam_scale",
    "fixed_class_maps",
    "fixed_scale",
    "normalize_cam",
    "overlay",
]
