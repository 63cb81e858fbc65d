"""Summaries, storage and display of normalized Grad-CAM maps.

* :func:`cam_summary`: per-image numbers from a ``(B, H, W)`` batch of maps in [0, 1],
  vectorized on the maps' device: hot area, peak location and the share of the map's mass
  in the image border. Markers, text labels and collimation edges live in the border, so a
  map whose mass sits there flags a likely shortcut (DeGrave et al. 2021, "AI for radiographic
  COVID-19 detection selects shortcuts over signal").
* :func:`overlay`: a map blended over its grayscale image with a jet (or any matplotlib)
  colormap, as an RGB uint8 array.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["border_mask", "cam_summary", "colormap_lut", "overlay"]


def _batched(cam: Tensor) -> Tensor:
    if cam.ndim == 2:
        return cam[None]
    if cam.ndim != 3:
        raise ValueError(f"expected a (B, H, W) or (H, W) map, got shape {tuple(cam.shape)}")
    return cam


def border_mask(
    height: int, width: int, border: float = 0.10, device: torch.device | str | None = None
) -> Tensor:
    """Bool ``(height, width)`` mask of the outer frame: rows within ``round(border * height)``
    and columns within ``round(border * width)`` pixels of an edge (at least one pixel when
    ``border > 0``)."""
    if not 0.0 <= border < 0.5:
        raise ValueError(f"border must lie in [0, 0.5), got {border}")

    def band(n: int) -> int:
        return 0 if border == 0 else max(1, round(border * n))

    by, bx = band(height), band(width)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows < by) | (rows >= height - by)
    in_cols = (cols < bx) | (cols >= width - bx)
    return in_rows[:, None] | in_cols[None, :]


def cam_summary(cam: Tensor, threshold: float = 0.5, border: float = 0.10) -> dict[str, Tensor]:
    """Per-image summary of normalized maps ``cam`` (``(B, H, W)`` or ``(H, W)``, in [0, 1]).

    Returns float32 tensors of shape ``(B,)`` on ``cam``'s device:

    * ``area``: fraction of pixels with ``cam >= threshold``;
    * ``peak_y``, ``peak_x``: the argmax (first one in row-major order on ties) in normalized
      coordinates, pixel centres: ``(row + 0.5) / H`` and ``(col + 0.5) / W``, so 0 is the top
      (left) edge of the image and 1 the bottom (right) edge;
    * ``border_energy``: share of the map's total mass (sum of its values) in the outer frame
      of width ``border`` (see :func:`border_mask`); 0 for an all-zero map. A uniform map
      gives the frame's area share (0.36 for ``border=0.10``).
    """
    c = _batched(cam).float()
    b, h, w = c.shape
    area = (c >= threshold).flatten(1).float().mean(dim=1)
    flat = c.flatten(1).argmax(dim=1)
    peak_y = ((flat // w).float() + 0.5) / h
    peak_x = ((flat % w).float() + 0.5) / w
    frame = border_mask(h, w, border, device=c.device)
    total = c.sum(dim=(1, 2))
    in_frame = (c * frame).sum(dim=(1, 2))
    border_energy = torch.where(total > 0, in_frame / total.clamp_min(1e-12), 0.0)
    return {
        "area": area,
        "peak_y": peak_y,
        "peak_x": peak_x,
        "border_energy": border_energy,
    }


def _jet_numpy(n: int = 256) -> np.ndarray:
    """The classic jet colormap (as in MATLAB/OpenCV), ``(n, 3)`` float in [0, 1]."""
    t = np.linspace(0.0, 1.0, n)
    r = np.clip(1.5 - np.abs(4.0 * t - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * t - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * t - 1.0), 0.0, 1.0)
    return np.stack([r, g, b], axis=1)


def colormap_lut(name: str = "jet", n: int = 256) -> np.ndarray:
    """``(n, 3)`` uint8 lookup table of a matplotlib colormap (``"jet"``, ``"turbo"``, ...);
    without matplotlib, only ``"jet"`` is available (computed with numpy)."""
    try:
        import matplotlib

        rgb = matplotlib.colormaps[name](np.linspace(0.0, 1.0, n))[:, :3]
    except ImportError:
        if name != "jet":
            raise ValueError(f"colormap {name!r} needs matplotlib; 'jet' works without") from None
        rgb = _jet_numpy(n)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _numpy(a: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def overlay(
    image: np.ndarray | Tensor,
    cam: np.ndarray | Tensor,
    alpha: float = 0.4,
    colormap: str = "jet",
) -> np.ndarray:
    """Blend a map over its image: ``(1 - alpha) * gray + alpha * colormap(cam)``.

    Args:
        image: ``H x W`` uint8 grayscale (or ``1 x H x W``).
        cam: ``H x W`` float map in [0, 1] (or ``1 x H x W``); resized bilinearly when its
            size differs from the image's.
        alpha: weight of the colored map.
        colormap: a matplotlib colormap name; ``"jet"`` as in the Grad-CAM paper.

    Returns:
        ``H x W x 3`` uint8 RGB.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    img = _numpy(image)
    m = _numpy(cam).astype(np.float32)
    img = img[0] if img.ndim == 3 and img.shape[0] == 1 else img
    m = m[0] if m.ndim == 3 and m.shape[0] == 1 else m
    if img.ndim != 2 or m.ndim != 2:
        raise ValueError(f"expected H x W image and map, got {img.shape} and {m.shape}")
    if img.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got {img.dtype}")
    if m.shape != img.shape:
        m = F.interpolate(
            torch.from_numpy(m)[None, None], size=img.shape, mode="bilinear", align_corners=False
        )[0, 0].numpy()
    lut = colormap_lut(colormap)
    index = np.rint(np.clip(np.nan_to_num(m), 0.0, 1.0) * (len(lut) - 1)).astype(np.intp)
    color = lut[index].astype(np.float32)
    gray = img.astype(np.float32)[..., None]
    out = (1.0 - alpha) * gray + alpha * color
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
