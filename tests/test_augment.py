"""kornia augmentation: shape/range/dtype/device kept, seeded determinism, real changes."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from covidray.augment import AugmentConfig, build_augmentation

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _batch(device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    # A smooth, non-symmetric image: a left-to-right ramp with a bright blob.
    ramp = torch.linspace(0, 1, 96).expand(96, 96)
    blob = torch.zeros(96, 96)
    blob[20:40, 10:30] = 1.0
    img = (0.6 * ramp + 0.4 * blob).clamp(0, 1)
    noise = 0.05 * torch.rand(4, 1, 96, 96, generator=g)
    return (img + noise).clamp(0, 1).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_range_device_dtype(device: str, dtype: torch.dtype) -> None:
    aug = build_augmentation(AugmentConfig()).to(device)
    x = _batch(device, dtype)
    y = aug(x)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert y.min() >= 0 and y.max() <= 1


def test_deterministic_with_seed_and_changes_image() -> None:
    aug = build_augmentation()
    x = _batch()
    torch.manual_seed(7)
    a = aug(x)
    torch.manual_seed(7)
    b = aug(x)
    torch.manual_seed(8)
    c = aug(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a - x).abs().mean() > 0.01
    # Per-sample parameters: the 4 identical-ish images are augmented differently.
    assert not torch.allclose(a[0], a[1], atol=0.05)


def test_runs_under_no_grad() -> None:
    aug = build_augmentation()
    x = _batch()
    with torch.no_grad():
        y = aug(x)
    assert not y.requires_grad and y.shape == x.shape


def test_config_switches() -> None:
    off = AugmentConfig(rotation_deg=0, shift=0, hflip=False, gamma=None, contrast=None)
    x = _batch()
    assert torch.equal(build_augmentation(off)(x), x)

    flip_only = AugmentConfig(rotation_deg=0, shift=0, gamma=None, contrast=None)
    torch.manual_seed(0)
    y = build_augmentation(flip_only)(x)
    flipped = [torch.equal(y[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(y[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))

    # Intensity only, always applied: geometry unchanged, values changed, mean roughly kept.
    intensity = AugmentConfig(rotation_deg=0, shift=0, hflip=False, p_intensity=1.0)
    torch.manual_seed(0)
    z = build_augmentation(intensity)(x)
    assert not torch.equal(z, x)
    assert (z.mean() - x.mean()).abs() < 0.1

    with pytest.raises(ValidationError):
        AugmentConfig(gamma=(1.25, 0.8))
    with pytest.raises(ValidationError):
        AugmentConfig(shift=1.5)
    with pytest.raises(ValidationError):
        AugmentConfig(unknown=1)
