"""GPU-friendly training augmentation with kornia: runs on whatever device the batch is on.

The paper's set (Zebin et al. 2020, Keras ``ImageDataGenerator``): rotation up to +-10 degrees,
width/height shift up to 10 %, horizontal flip; plus mild intensity changes (random gamma and
contrast around each image's mean), each applied with probability ``p_intensity``.

Horizontal flip is on by default because the paper used it, but it is anatomically wrong for
chest X-rays: it moves the heart to the right side (situs inversus looks). Set ``hflip=False``
to keep anatomy plausible.

Acquisition augmentation (``acquisition=True``, ``covidray train --acquisition-augment``; off
by default) makes each film look as another scanner and another site's processing could have
made it: stronger gamma and contrast, blur, noise, sharpening, down-and-up sampling and JPEG
artefacts, each with its own probability (:data:`ACQUISITION`). It is a recipe option against
source shortcuts (docs/source-study.md).
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

from .config import AugmentConfig

__all__ = ["ACQUISITION", "AugmentConfig", "Clamp01", "DownUp", "JpegBlocks", "build_augmentation"]

# Acquisition augmentation: (transform, probability) parameters, applied in this order.
ACQUISITION: dict[str, dict[str, object]] = {
    "gamma": {"gamma": (0.6, 1.6), "p": 0.5},
    "contrast": {"contrast": (0.6, 1.4), "p": 0.5},
    "blur": {"kernel_size": (5, 5), "sigma": (0.1, 1.5), "p": 0.3},
    "sharpen": {"sharpness": (0.0, 1.0), "p": 0.3},
    "downup": {"scale": (0.35, 0.8), "p": 0.3},
    "noise": {"std": 0.03, "p": 0.3},
    "jpeg": {"jpeg_quality": (30.0, 90.0), "p": 0.3},
}


class DownUp(nn.Module):
    """With probability ``p`` per film: downsample by a random factor in ``scale`` and back
    (bilinear), the detail a lower-resolution detector or a resized export loses."""

    def __init__(self, scale: tuple[float, float], p: float) -> None:
        super().__init__()
        self.scale, self.p = scale, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen = torch.rand(len(x), device=x.device) < self.p
        if not chosen.any():
            return x
        out = x.clone()
        h, w = x.shape[-2:]
        for i in torch.nonzero(chosen).flatten().tolist():
            f = float(torch.empty(()).uniform_(*self.scale))
            small = F.interpolate(
                x[i : i + 1], size=(max(8, round(h * f)), max(8, round(w * f))), mode="bilinear"
            )
            out[i : i + 1] = F.interpolate(small, size=(h, w), mode="bilinear")
        return out


def acquisition_layers() -> list[nn.Module]:
    """The acquisition augmentation's kornia modules (:data:`ACQUISITION`)."""
    a = ACQUISITION
    return [
        K.RandomGamma(**a["gamma"]),
        K.ColorJitter(brightness=0.0, saturation=0.0, hue=0.0, **a["contrast"]),
        K.RandomGaussianBlur(**a["blur"]),
        K.RandomSharpness(**a["sharpen"]),
        DownUp(**a["downup"]),
        K.RandomGaussianNoise(mean=0.0, **a["noise"]),
        JpegBlocks(**a["jpeg"]),
    ]


# JPEG's luminance quantisation table (ITU-T T.81, Annex K), row by row.
_JPEG_LUMA = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)


def _dct8() -> torch.Tensor:
    k = torch.arange(8, dtype=torch.float32)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * torch.pi / 16) * (2 / 8) ** 0.5
    d[0] /= 2**0.5
    return d  # orthonormal: d @ d.T = I


class JpegBlocks(nn.Module):
    """With probability ``p`` per film: JPEG's lossy step on gray films (8×8 block DCT,
    the luminance table scaled to a random quality in ``jpeg_quality``, rounding, inverse),
    the blocking and ringing of a compressed export. Cheaper than a full codec on 3 channels."""

    def __init__(self, jpeg_quality: tuple[float, float], p: float) -> None:
        super().__init__()
        self.quality, self.p = jpeg_quality, p
        self.register_buffer("dct", _dct8(), persistent=False)
        self.register_buffer(
            "table", torch.tensor(_JPEG_LUMA, dtype=torch.float32), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen = torch.nonzero(torch.rand(len(x), device=x.device) < self.p).flatten()
        if not len(chosen):
            return x
        out = x.clone()
        b, c, h, w = x[chosen].shape
        ph, pw = -h % 8, -w % 8
        v = F.pad(x[chosen], (0, pw, 0, ph), mode="replicate") * 255 - 128
        blocks = v.reshape(b, c, (h + ph) // 8, 8, (w + pw) // 8, 8).transpose(3, 4)
        q = torch.empty(b, device=x.device).uniform_(*self.quality)
        scale = torch.where(q < 50, 5000 / q, 200 - 2 * q).view(b, 1, 1, 1, 1, 1)
        table = ((self.table * scale + 50) / 100).floor().clamp(1, 255)
        coef = self.dct @ blocks @ self.dct.T
        blocks = self.dct.T @ (torch.round(coef / table) * table) @ self.dct
        v = blocks.transpose(3, 4).reshape(b, c, h + ph, w + pw)[..., :h, :w]
        out[chosen] = ((v + 128) / 255).clamp(0, 1).to(x.dtype)
        return out


class Clamp01(nn.Module):
    """Clamp to [0, 1] (interpolation can overshoot by rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


def build_augmentation(
    cfg: AugmentConfig | None = None, *, acquisition: bool = False
) -> nn.Sequential:
    """An ``nn.Sequential`` of kornia modules for ``B x C x H x W`` float tensors in [0, 1].

    Parameters are drawn per sample from torch's global RNG on the batch's device (seed with
    ``torch.manual_seed`` for reproducibility). Output: same shape, device and dtype, in
    [0, 1]. Call it in training only (it augments in both train and eval mode).
    ``acquisition`` appends the acquisition augmentation (:func:`acquisition_layers`).
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
    if acquisition:
        layers.extend(acquisition_layers())
    layers.append(Clamp01())
    return nn.Sequential(*layers)
