"""The Secondary Capture of one in-scope film: the dataset's normalised film with its Grad-CAM
overlay burnt in and a visible "research use, not for diagnosis" caption, as an RGB image in
the source's study (highdicom's ``SCImage.from_ref_dataset``: patient and study modules
copied from the source's metadata)."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..codec import decode_png_u8
from ..explain import overlay
from .sr import MANUFACTURER, SC_SERIES_NUMBER, SERIES_DESCRIPTION

CAPTION = "RESEARCH USE - NOT FOR DIAGNOSIS"
ALPHA = 0.4  # as covidray score --overlays


def captioned(rgb: np.ndarray, text: str = CAPTION) -> np.ndarray:
    """``rgb`` with a black band below it holding ``text`` in white (burnt in)."""
    h, w, _ = rgb.shape
    size = max(10, w // 24)
    font = _font(size)
    band = int(size * 1.8)
    canvas = Image.new("RGB", (w, h + band), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb, "RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = max(2, (w - (right - left)) // 2)
    y = h + (band - (bottom - top)) // 2 - top
    draw.text((x, y), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without scalable default fonts
        return ImageFont.load_default()


def overlay_image(film_png: bytes, cam_png: bytes) -> np.ndarray:
    """The film (ingest's normalised PNG) with its Grad-CAM map blended in, captioned."""
    film = decode_png_u8(film_png)
    cam = decode_png_u8(cam_png).astype(np.float32) / 255.0
    return captioned(overlay(film, cam, alpha=ALPHA))


def build_sc(
    source: Any, rgb: np.ndarray, *, series_uid: str, sop_uid: str, instance_number: int
) -> Any:
    """The Secondary Capture of ``rgb`` in ``source``'s study (``source``: its metadata)."""
    import highdicom as hd

    orientation = source.get("PatientOrientation")
    orientation = tuple(orientation) if orientation is not None and len(orientation) == 2 else None
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT" if orientation else None,
        series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=orientation,
        series_description=SERIES_DESCRIPTION,
        content_qualification="RESEARCH",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
