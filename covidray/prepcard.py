"""The preprocessing a model card records (:class:`Preprocessing`) and the methods this code
applies (:func:`describe`): plain data, no torch. :mod:`covidray.preprocess` applies them;
:mod:`covidray.modeldir` stores them in the card."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

# The methods covidray.preprocess applies (it maps the names to PIL and torch).
SHORTER_SIDE_RESAMPLE = "lanczos"
SQUARE_MODE = "bilinear"
SQUARE_ANTIALIAS = True
BIT_DEPTH = 8  # of the stored film and of the model input cache (uint8)
# Contrast normalisation of the model input: TrainConfig.contrast → the card's description.
CLAHE_CLIP, CLAHE_GRID = 2.0, 8
CONTRAST: dict[str, str] = {
    "none": "none",
    "clahe": f"kornia equalize_clahe clip {CLAHE_CLIP} grid {CLAHE_GRID}x{CLAHE_GRID}",
    "equalize": "kornia equalize (256 bins)",
}

# What every model before the card recorded its preprocessing was trained with: ingest's
# default shorter side and the methods of covidray.preprocess at the time.
LEGACY_PREPROCESSING = {
    "shorter_side": 256,
    "bit_depth": 8,
    "shorter_side_resample": "lanczos",
    "square_resize": "bilinear+antialias",
}


def describe(shorter_side: int, contrast: str = "none") -> dict[str, Any]:
    """This code's preprocessing parameters, as a model card records them (``contrast``: a
    key of :data:`CONTRAST`)."""
    return {
        "shorter_side": shorter_side,
        "bit_depth": BIT_DEPTH,
        "shorter_side_resample": SHORTER_SIDE_RESAMPLE,
        "square_resize": SQUARE_MODE + ("+antialias" if SQUARE_ANTIALIAS else ""),
        "contrast": CONTRAST[contrast],
    }


def contrast_method(description: str) -> str:
    """The :data:`CONTRAST` key of a card's contrast description; a ValueError for one this
    code does not apply (other parameters, a method of a later version)."""
    for key, text in CONTRAST.items():
        if text == description:
            return key
    raise ValueError(
        f"the model was trained with a contrast normalisation this code does not apply: "
        f"{description!r}"
    )


class Preprocessing(BaseModel):
    """How an image must be prepared for the model (``covidray.preprocess``; the method fields
    come from the code that applies them: :func:`describe`)."""

    model_config = ConfigDict(extra="forbid")

    input_size: int
    shorter_side: int = LEGACY_PREPROCESSING["shorter_side"]  # ingest's normalisation
    bit_depth: int = LEGACY_PREPROCESSING["bit_depth"]
    shorter_side_resample: str = LEGACY_PREPROCESSING["shorter_side_resample"]
    square_resize: str = LEGACY_PREPROCESSING["square_resize"]
    contrast: str = "none"  # CONTRAST's description: normalisation of the model input
    value_range: str = "decode_image: float [0, 1], 1×H×W"
    channels: str = "gray→3 replicated"
    resize: str = "squash bilinear antialias"
    normalization: dict[str, list[float]]  # mean/std per replicated channel, inside the model


def check_card(prep: Preprocessing) -> None:
    """Refuse a card whose recorded methods differ from what this code applies."""
    ours = describe(prep.shorter_side, contrast_method(prep.contrast))
    theirs = {k: getattr(prep, k) for k in ours}
    if theirs != ours:
        diff = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
        raise ValueError(
            f"the model was trained with other preprocessing than this code applies "
            f"(card, code): {diff}"
        )
