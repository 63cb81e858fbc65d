"""How well the input gate separates frontal chest films from what a hospital archive also
holds: AUROC and the rejection rate at the model's threshold, per kind of out-of-scope image,
with intervals (the samples are small), and the false-rejection rate on in-scope films.

Kinds: the CT slices and lateral films of ``../shared/data/ood``; photographs and screenshots
that scikit-image ships (no download); and negatives made here (:func:`made_negatives`):
other-body-part phantoms (a forearm), inverted and rotated chest films, text screenshots.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel

from ..decode import decode_array
from ..gate import energy
from ..predict import Predictor, select_layers
from ..preprocess import contrast_method, prepare_array
from ..viewcheck import LATERAL_REASON
from .intervals import auroc, bootstrap, wilson

PHOTOGRAPHS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "horse",
    "rocket",
    "clock",
    "moon",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "grass",
    "gravel",
)
SCREENSHOTS = ("text", "page", "logo", "colorwheel", "checkerboard")


class KindFigures(BaseModel):
    n: int
    auroc: float  # the gate's score (ood_score) against the in-scope films
    auroc_interval: tuple[float, float] | None  # bootstrap 95 %
    energy_auroc: float  # the energy score, for comparison
    layer_auroc: dict[str, float] = {}  # each feature layer's distance alone, for comparison
    rejected: int  # refused by the image gate: the distance, then the view check
    refused_by_view: int = 0  # of those, by the view check (image_view:lateral)
    rejection_rate: float
    rejection_interval: tuple[float, float] | None  # Wilson 95 %


class GateEvaluation(BaseModel):
    n_in_scope: int
    false_rejection_rate: float  # the image gate's: distance and view check
    false_rejection_interval: tuple[float, float] | None
    false_rejections_by_view: int = 0  # in-scope films the view check called lateral
    threshold: float
    feature_layers: tuple[str, ...]
    view_check: bool = False  # whether the model has one
    kinds: dict[str, KindFigures]


def _gray(image: np.ndarray) -> np.ndarray:
    """Any skimage image → 8-bit gray ``H×W`` (luminance; alpha composited on black)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr.astype(np.float64) / max(float(arr.max()), 1e-9) * 255, 0, 255)
        arr = arr.astype(np.uint8)
    if arr.ndim == 3:
        mode = "RGBA" if arr.shape[2] == 4 else "RGB"
        arr = np.asarray(Image.fromarray(arr[..., : len(mode)], mode).convert("L"))
    return arr


def skimage_images(names: Sequence[str]) -> list[np.ndarray]:
    """The named images scikit-image ships, those present offline (none without skimage)."""
    try:
        import skimage.data as data
    except ImportError:
        return []
    out = []
    for name in names:
        try:
            out.append(_gray(getattr(data, name)()))
        except Exception:  # an image the installed version would download: left out
            continue
    return out


def shared_ood(folder: Path) -> dict[str, list[bytes]]:
    """``../shared/data/ood``'s files by kind (``ct``, ``lateral``), as raw bytes."""
    kinds: dict[str, list[bytes]] = {}
    with open(folder / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            kinds.setdefault(row["kind"], []).append((folder / row["image"]).read_bytes())
    return kinds


def forearm_phantom(rng: np.random.Generator, size: int = 512) -> np.ndarray:
    """An X-ray-like film of another body part: a forearm's soft tissue and two long bones."""
    y, x = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(-0.4, 0.4)
    u = (x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle)
    film = 0.08 + 0.35 * np.exp(-((u / rng.uniform(0.16, 0.24)) ** 6))  # soft tissue
    for offset, width in ((-0.06, 0.035), (0.05, 0.03)):  # radius and ulna
        d = np.abs(u - offset - rng.uniform(-0.01, 0.01)) / width
        film += np.where(d < 1, 0.35 + 0.25 * (d > 0.6), 0.0)  # cortex brighter than marrow
    film += rng.normal(0, 0.03, film.shape)
    return (np.clip(film, 0, 1) * 255).astype(np.uint8)


def text_screenshot(rng: np.random.Generator, size: tuple[int, int] = (640, 480)) -> np.ndarray:
    """A screen of text (a worklist or a report) as a viewer might save it."""
    img = Image.new("L", size, int(rng.integers(200, 256)))
    draw = ImageDraw.Draw(img)
    for row in range(int(rng.integers(12, 24))):
        words = " ".join(
            "".join(chr(int(c)) for c in rng.integers(97, 123, int(rng.integers(2, 9))))
            for _ in range(int(rng.integers(3, 10)))
        )
        draw.text((10, 8 + 20 * row), words, fill=int(rng.integers(0, 60)))
    return np.asarray(img)


def made_negatives(films: Sequence[np.ndarray], seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Out-of-scope images made here: forearms, inverted and rotated chest films, screens."""
    rng = np.random.default_rng(seed)
    return {
        "other_body_part": [forearm_phantom(rng) for _ in range(20)],
        "inverted_film": [255 - f for f in films],
        "rotated_film": [np.rot90(f, k=int(rng.integers(1, 4))).copy() for f in films],
        "text_screenshot": [text_screenshot(rng) for _ in range(20)],
    }


def model_inputs(predictor: Predictor, images: Sequence[bytes | np.ndarray]) -> np.ndarray:
    """Raw image bytes or 8-bit gray arrays → the model's ``N×1×S×S`` uint8 inputs (the
    card's preprocessing)."""
    prep = predictor.card.preprocessing
    return np.stack(
        [
            prepare_array(
                decode_array(i) if isinstance(i, bytes) else i.astype(np.float32) / 255,
                prep.input_size,
                prep.shorter_side,
                contrast_method(prep.contrast),
            )
            for i in images
        ]
    )[:, None]


def out_of_scope_sets(films: Sequence[bytes], ood: Path | None) -> dict[str, list]:
    """Every kind of out-of-scope image, by name: ``ood``'s CT slices and laterals (when the
    folder has a manifest), scikit-image's photographs and screenshots, and the negatives made
    from the first 20 of ``films`` (in-scope films' raw bytes) and from scratch."""
    kinds: dict[str, list] = {}
    if ood is not None and (ood / "manifest.csv").exists():
        kinds.update(shared_ood(ood))
    kinds["photograph"] = skimage_images(PHOTOGRAPHS)
    kinds["screenshot"] = skimage_images(SCREENSHOTS)
    u8 = [(decode_array(f) * 255).round().astype("uint8") for f in films[:20]]
    kinds.update(made_negatives(u8))
    return kinds


class _Scores(NamedTuple):
    ood: np.ndarray  # ood_score
    energy: np.ndarray
    layers: np.ndarray  # each gate layer's distance (N, L)
    refused: np.ndarray  # by the image gate (distance, then view check)
    by_view: np.ndarray  # by the view check


def _scores(predictor: Predictor, images: Sequence[bytes | np.ndarray]) -> _Scores:
    """The gate's scores and verdicts on ``images``."""
    batch = model_inputs(predictor, images)
    res = predictor.predict_many(batch, 32, with_cam=False, return_features=True)
    if predictor.gate_stats is None or res.features is None or res.feature_dims is None:
        raise ValueError("the model has no input gate: fit one (covidray calibrate)")
    mine = select_layers(
        res.features, predictor.feature_layers, res.feature_dims, predictor.gate.feature_layers
    )
    return _Scores(
        res.ood_score,
        energy(res.logits),
        predictor.gate_stats.distances(mine),
        ~res.in_scope,
        np.array([r == LATERAL_REASON for r in res.gate_reason], dtype=bool),
    )


def evaluate_gate(
    predictor: Predictor,
    in_scope: Sequence[bytes | np.ndarray],
    kinds: dict[str, Sequence[bytes | np.ndarray]],
) -> GateEvaluation:
    """The gate's figures: ``in_scope`` are frontal chest films (the test split), ``kinds``
    the out-of-scope sets by name."""
    if predictor.gate is None:
        raise ValueError("the model has no input gate: fit one (covidray calibrate)")
    gate = predictor.gate
    ins = _scores(predictor, in_scope)
    rejected_in = int(ins.refused.sum())
    figures = {}
    for kind, images in kinds.items():
        if not images:
            continue
        out = _scores(predictor, images)
        rejected = int(out.refused.sum())
        figures[kind] = KindFigures(
            n=len(out.ood),
            auroc=auroc(ins.ood, out.ood),
            auroc_interval=_auroc_interval(ins.ood, out.ood),
            energy_auroc=auroc(ins.energy, out.energy),
            layer_auroc={
                name: auroc(ins.layers[:, i], out.layers[:, i])
                for i, name in enumerate(gate.feature_layers)
            },
            rejected=rejected,
            refused_by_view=int(out.by_view.sum()),
            rejection_rate=rejected / len(out.ood),
            rejection_interval=wilson(rejected, len(out.ood)),
        )
    return GateEvaluation(
        n_in_scope=len(ins.ood),
        false_rejection_rate=rejected_in / len(ins.ood),
        false_rejection_interval=wilson(rejected_in, len(ins.ood)),
        false_rejections_by_view=int(ins.by_view.sum()),
        threshold=gate.threshold,
        feature_layers=gate.feature_layers,
        view_check=predictor.view is not None,
        kinds=figures,
    )


def _auroc_interval(neg: np.ndarray, pos: np.ndarray) -> tuple[float, float] | None:
    """Bootstrap of the AUROC, resampling each group separately."""
    labels = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    scores = np.r_[neg, pos]

    def stat(s: np.ndarray, y: np.ndarray) -> float:
        return auroc(s[y == 0], s[y == 1])

    return bootstrap(stat, scores, labels)
