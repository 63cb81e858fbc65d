"""Pixel values and PNG bytes: the conversions every module shares.

- Unit floats ([0, 1]) ↔ 8-bit: :func:`unit_to_u8` and :func:`u8_to_unit` (numpy),
  :func:`unit_to_u8_tensor` and :func:`u8_to_unit_tensor` (torch). Rounding to nearest,
  values outside [0, 1] clipped.
- PNG: :func:`encode_png` (8-bit gray ``H×W`` or RGB ``H×W×3``), :func:`decode_png_u8` (a
  PNG this project wrote, e.g. a stored Grad-CAM map, back to 8-bit gray). Input images from
  outside go through :mod:`covidray.decode`, which checks everything.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

# zlib level for images written in bulk (ingest, generated images): about as small as the
# default level 6 for X-rays, and faster.
FAST_PNG = 3


def unit_to_u8(image: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] → uint8 0..255 (rounded, clipped)."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def u8_to_unit(image: np.ndarray) -> np.ndarray:
    """uint8 0..255 → float32 in [0, 1] (``decode``'s conversion of 8-bit data)."""
    out = image.astype(np.float32)
    out /= 255.0
    return out


def unit_to_u8_tensor(x: torch.Tensor) -> torch.Tensor:
    """A tensor in [0, 1] → uint8 0..255 (rounded, clipped): 4× smaller than float32."""
    return (x.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def u8_to_unit_tensor(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 → float32 in [0, 1]."""
    return x.float().div_(255.0)


def encode_png(image: np.ndarray, *, compress_level: int = 6, optimize: bool = False) -> bytes:
    """An 8-bit ``H×W`` (gray) or ``H×W×3`` (RGB) array as PNG bytes."""
    arr = np.ascontiguousarray(image, dtype=np.uint8)
    if arr.ndim == 2:
        mode = "L"
    elif arr.ndim == 3 and arr.shape[2] == 3:
        mode = "RGB"
    else:
        raise ValueError(f"expected H×W or H×W×3 pixels, got shape {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(
        buf, format="PNG", compress_level=compress_level, optimize=optimize
    )
    return buf.getvalue()


def decode_png_u8(data: bytes) -> np.ndarray:
    """A PNG written by :func:`encode_png` → ``H×W`` uint8 (colour becomes gray)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L"), dtype=np.uint8)
