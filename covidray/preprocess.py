"""From image bytes to the model's input: the one preprocessing path of every entry point.

1. decode (``decode.py``): ``H×W`` floats in [0, 1];
2. normalize the film as ingest stores it (:func:`normalize_film`): resized so its shorter side
   is the card's ``shorter_side`` (Lanczos, in float), then 8 bits;
3. the square resize to the model's input size (:func:`model_input_u8`, antialiased
   bilinear), kept as 8 bits; the model divides by 255 and normalizes (mean/std) inside;
4. where the card says so, contrast normalisation of that input (:func:`normalize_contrast`:
   CLAHE or histogram equalisation, kornia's), a recipe option against source shortcuts.

Training and ``evaluate`` read ingest's output, for which step 2 changes nothing; ``covidray
score`` on raw files and the HTTP endpoint run all three steps on the original bytes
(:func:`prepare_bytes`), so a full-resolution or 16-bit film gets the pixels it would have had
through ingest. The parameters go into the model card from the constants used here
(:mod:`covidray.prepcard`), and :func:`check_card` refuses a card whose recorded methods this
code does not apply.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import prepcard
from .codec import u8_to_unit, u8_to_unit_tensor, unit_to_u8, unit_to_u8_tensor
from .decode import DEFAULT_MAX_PIXELS, decode_array
from .prepcard import CLAHE_CLIP, CLAHE_GRID, CONTRAST, Preprocessing
from .prepcard import check_card as check_card  # callers check a card where they prepare
from .prepcard import contrast_method as contrast_method  # the card's description → method

SHORTER_SIDE_RESAMPLE = Image.Resampling[prepcard.SHORTER_SIDE_RESAMPLE.upper()]
DEFAULT_SIZE = 224


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a float H×W image (Lanczos, in float) so its shorter side is ``size``."""
    h, w = image.shape
    if min(h, w) == size:
        return image
    scale = size / min(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image, mode="F").resize(new, SHORTER_SIDE_RESAMPLE))


def to_model_input(image: torch.Tensor, size: int = DEFAULT_SIZE) -> torch.Tensor:
    """``1×H×W`` (or ``B×1×H×W``) in [0, 1] → ``…×1×size×size`` float32, antialiased bilinear."""
    batched = image.dim() == 4
    x = image if batched else image.unsqueeze(0)
    x = x.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(
            x,
            size=(size, size),
            mode=prepcard.SQUARE_MODE,
            align_corners=False,
            antialias=prepcard.SQUARE_ANTIALIAS,
        )
        x = x.clamp_(0.0, 1.0)
    return x if batched else x.squeeze(0)


def normalize_film(image: np.ndarray, shorter_side: int) -> np.ndarray:
    """A decoded ``H×W`` float film as ingest stores it: shorter side ``shorter_side``, uint8."""
    return unit_to_u8(resize_shorter_side(image, shorter_side))


def model_input_u8(film: np.ndarray, size: int) -> np.ndarray:
    """An 8-bit film → the model's ``size×size`` uint8 input."""
    x = to_model_input(torch.from_numpy(u8_to_unit(film))[None], size)
    return unit_to_u8_tensor(x)[0].numpy()


def normalize_contrast(x: np.ndarray, method: str) -> np.ndarray:
    """An ``S×S`` uint8 model input with its contrast normalised (``method``: a key of
    :data:`CONTRAST`; ``none`` returns it as it is)."""
    if method == "none":
        return x
    import kornia.enhance as KE  # only models trained with it pay for the import

    t = u8_to_unit_tensor(torch.from_numpy(np.ascontiguousarray(x)))[None, None]
    if method == "clahe":
        out = KE.equalize_clahe(t, clip_limit=CLAHE_CLIP, grid_size=(CLAHE_GRID, CLAHE_GRID))
    elif method == "equalize":
        out = KE.equalize(t)
    else:
        raise ValueError(f"unknown contrast normalisation {method!r}: choose {list(CONTRAST)}")
    return unit_to_u8_tensor(out.clamp_(0.0, 1.0))[0, 0].numpy()


def prepare_array(
    image: np.ndarray, size: int, shorter_side: int | None, contrast: str = "none"
) -> np.ndarray:
    """A decoded float film → the model's ``size×size`` uint8 input; ``shorter_side`` None
    skips the ingest normalisation (the film is ingest's output already); ``contrast``: a key
    of :data:`CONTRAST` (:func:`contrast_method` of the card's)."""
    film = unit_to_u8(image) if shorter_side is None else normalize_film(image, shorter_side)
    return normalize_contrast(model_input_u8(film, size), contrast)


def prepare_bytes(
    data: bytes, prep: Preprocessing, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Raw image bytes (any format ``decode`` takes) → the ``S×S`` uint8 input of the model
    whose card says ``prep``. Raises :class:`covidray.decode.DecodeError` for bad bytes."""
    image = decode_array(data, max_pixels=max_pixels)
    return prepare_array(image, prep.input_size, prep.shorter_side, contrast_method(prep.contrast))
