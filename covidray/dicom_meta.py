"""DICOM header fields as plain values: patient, view, sex, age, study date, modality, body
part.

Only the header is read (no pixels). Values are parsed, never echoed into errors: a header
element that cannot be decoded raises :class:`covidray.decode.DecodeError` naming only its type.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Any

from .decode import DecodeError, DecodeReason, is_dicom, quiet, read_dicom

__all__ = ["dicom_tags"]


def dicom_tags(data: bytes) -> dict[str, Any]:
    """Header fields of a DICOM file (pixels are not read).

    Keys: ``patient_id`` (raw PatientID or None), ``view`` (ViewPosition), ``sex`` (PatientSex),
    ``age`` (float years from PatientAge such as ``045Y``/``006M``), ``study_date``
    (``YYYY-MM-DD``), ``modality``, ``body_part`` (BodyPartExamined); each None when absent,
    empty or unparseable.
    """
    if len(data) == 0:
        raise DecodeError(DecodeReason.EMPTY, "no bytes")
    if not is_dicom(data):
        raise DecodeError(DecodeReason.NOT_AN_IMAGE, "not a DICOM file (no DICM preamble)")
    with quiet():
        ds = read_dicom(data, stop_before_pixels=True)
        try:
            return {
                "patient_id": _text(ds, "PatientID"),
                "view": _text(ds, "ViewPosition"),
                "sex": _text(ds, "PatientSex"),
                "age": _parse_age(_text(ds, "PatientAge")),
                "study_date": _parse_date(_text(ds, "StudyDate")),
                "modality": _text(ds, "Modality"),
                "body_part": _text(ds, "BodyPartExamined"),
            }
        except Exception as exc:  # an element that cannot be decoded; never quote its value
            raise DecodeError(
                DecodeReason.CORRUPT, f"DICOM header element unreadable ({type(exc).__name__})"
            ) from None


def _text(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


_AGE = re.compile(r"(\d{1,3})\s*([DWMY]?)", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}


def _parse_age(text: str | None) -> float | None:
    """PatientAge ``nnnD|W|M|Y`` (bare digits read as years) -> float years."""
    match = _AGE.fullmatch(text) if text else None
    if match is None:
        return None
    return int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2).upper()]


def _parse_date(text: str | None) -> str | None:
    """DA ``YYYYMMDD`` (or legacy ``YYYY.MM.DD``) -> ``YYYY-MM-DD``; invalid -> None."""
    if not text:
        return None
    digits = text.replace(".", "").replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).isoformat()
    except ValueError:
        return None
