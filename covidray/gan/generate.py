"""`covidray gan generate`: translate TRAIN-split domain-A images into a synthetic dataset.

Only TRAIN rows of the generator's domain A (and its domain filter, unless overridden) are
translated, never val or test. Each output is squash-resized back to its source image's stored
size (whose shorter side is the dataset's), written as an 8-bit gray PNG named by its sha256,
and described by a manifest row: ``synthetic=True``, label = domain B, ``split="train"``,
``patient_id="gan:<source patient>"``, ``source="cyclegan"``, ``source_image_id`` and
``generator_version``. When more images are asked for than there are sources, sources are
reused with a random crop (``reuse="jitter"``), so outputs differ; ``reuse="never"`` stops at
one image per source.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import BaseModel

from .. import storage
from ..codec import FAST_PNG, encode_png, unit_to_u8
from ..dataset import load_rows
from ..decode import decode_image
from ..labels import DEFAULT_SUBTYPE
from ..manifest import MANIFEST_NAME, image_path, to_table
from ..modeldir import load_generator
from ..preprocess import to_model_input
from .config import DomainFilter, GenerateConfig
from .data import domain_rows, from_gan

log = logging.getLogger(__name__)

SOURCE = "cyclegan"
Progress = Callable[[int, int], None]


class GenerateResult(BaseModel):
    manifest_uri: str
    n_images: int
    n_sources: int  # distinct source images used
    generator_version: str
    label: str


def pick_sources(n_available: int, n: int, reuse: str, seed: int) -> list[tuple[int, bool]]:
    """``(source index, jitter?)`` for each output: every source once (shuffled), then, if
    ``reuse == "jitter"``, further seeded passes with a random crop until ``n``."""
    rng = np.random.default_rng(seed)
    picks = [(int(i), False) for i in rng.permutation(n_available)[:n]]
    while reuse == "jitter" and len(picks) < n:
        picks += [(int(i), True) for i in rng.permutation(n_available)[: n - len(picks)]]
    return picks


def _input(image: torch.Tensor, size: int, jitter: bool, rng: np.random.Generator) -> torch.Tensor:
    """``1×H×W`` [0, 1] → ``1×size×size`` in [-1, 1]; with ``jitter`` a random 88–100 % crop."""
    if jitter:
        _, h, w = image.shape
        scale = rng.uniform(0.88, 1.0)
        ch, cw = max(8, round(h * scale)), max(8, round(w * scale))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        image = image[:, y : y + ch, x : x + cw]
    return to_model_input(image, size) * 2.0 - 1.0


def _resize_back(fake: torch.Tensor, height: int, width: int) -> np.ndarray:
    """``1×S×S`` in [-1, 1] → ``height×width`` uint8 (antialiased bilinear)."""
    x = F.interpolate(from_gan(fake)[None], size=(height, width), mode="bilinear", antialias=True)
    return unit_to_u8(x.clamp(0.0, 1.0)[0, 0].numpy())


def generate(cfg: GenerateConfig, progress: Progress | None = None) -> GenerateResult:
    """Write ``cfg.n`` synthetic images and ``<cfg.out>/manifest.parquet``."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator, card = load_generator(cfg.model, device)
    flt = cfg.filter or DomainFilter.model_validate(card.filter_a)
    sources = domain_rows(load_rows(cfg.data), card.domain_a, flt)
    if sources.empty:
        raise ValueError(f"{cfg.data}: no TRAIN rows of {card.domain_a!r} pass the filter {flt}")
    picks = pick_sources(len(sources), cfg.n, cfg.reuse, cfg.seed)
    if len(picks) < cfg.n:
        log.warning(
            "only %d %s sources: writing %d images", len(sources), card.domain_a, len(picks)
        )
    rng = np.random.default_rng(cfg.seed + 1)
    label = card.domain_b
    rows: list[dict] = []
    seen: set[str] = set()
    decoded: dict[int, torch.Tensor] = {}
    for start in range(0, len(picks), cfg.batch_size):
        chunk = picks[start : start + cfg.batch_size]
        images = []
        for i, _ in chunk:
            if i not in decoded:
                decoded[i] = decode_image(storage.read_bytes(sources["uri"][i]))
            images.append(decoded[i])
        x = torch.stack(
            [_input(img, card.size, j, rng) for img, (_, j) in zip(images, chunk, strict=True)]
        )
        with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
            fake = generator(x.to(device)).float().cpu()
        for (i, _), img, out in zip(chunk, images, fake, strict=True):
            src = sources.iloc[i]
            pixels = _resize_back(out, img.shape[1], img.shape[2])
            png = encode_png(pixels, compress_level=FAST_PNG)
            image_id = hashlib.sha256(png).hexdigest()
            if image_id in seen:  # an identical output: nothing new to add
                continue
            seen.add(image_id)
            storage.write_bytes(storage.join(cfg.out, image_path(image_id)), png)
            rows.append(
                {
                    "image_id": image_id,
                    "uri": image_path(image_id),
                    "label": label,
                    "subtype": DEFAULT_SUBTYPE[label],
                    "patient_id": f"gan:{src['patient_id']}",
                    "view": _str_or_none(src.get("view")),
                    "age_group": _str_or_none(src.get("age_group")),
                    "source": SOURCE,
                    "source_uri": src["uri"],
                    "split": "train",
                    "synthetic": True,
                    "source_image_id": src["image_id"],
                    "generator_version": card.generator_version,
                    "width": int(pixels.shape[1]),
                    "height": int(pixels.shape[0]),
                }
            )
        if progress is not None:
            progress(min(start + cfg.batch_size, len(picks)), len(picks))
    manifest_uri = storage.join(cfg.out, MANIFEST_NAME)
    storage.write_parquet(to_table(rows), manifest_uri)
    return GenerateResult(
        manifest_uri=manifest_uri,
        n_images=len(rows),
        n_sources=len({r["source_image_id"] for r in rows}),
        generator_version=card.generator_version,
        label=label,
    )


def _str_or_none(v: object) -> str | None:
    return None if v is None or (isinstance(v, float) and pd.isna(v)) else str(v)
