"""A view dataset like ../shared/data/views, drawn here: crude frontal and lateral films."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def _film(kind: str, seed: int, size: int = 96) -> np.ndarray:
    """A crude frontal (two lung fields side by side) or lateral (one field, a spine at the
    back) film, 8-bit."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    if kind == "frontal":
        lungs = sum(np.exp(-(((x - c) / 0.14) ** 2 + ((y - 0.5) / 0.3) ** 2)) for c in (0.3, 0.7))
    else:
        lungs = np.exp(-(((x - 0.45) / 0.25) ** 2 + ((y - 0.5) / 0.3) ** 2))
        lungs -= 0.6 * (np.abs(x - 0.85) < 0.05)
    img = 0.8 - 0.6 * lungs + 0.1 * rng.random((size, size))
    return np.uint8(np.clip(img, 0, 1) * 255)


def write_view_set(folder: Path, n: int = 6) -> str:
    """A view dataset like ../shared/data/views: a manifest with a view column, no labels."""
    (folder / "images").mkdir(parents=True)
    with open(folder / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "view", "patient_id"])
        for i in range(n):
            for kind, view in (("frontal", "PA"), ("lateral", "L")):
                name = f"images/{kind}{i}.png"
                Image.fromarray(_film(kind, i), "L").save(folder / name)
                w.writerow([name, view, f"views:{i}"])
    return str(folder)
