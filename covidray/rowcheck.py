"""Per-row checks of the metadata a source gives an image: types, ranges, lengths.

A layout's metadata (a ``manifest.csv``, an ieee8023 ``metadata.csv``, DICOM tags) is data
written by someone else. :func:`check_row` holds one row against the manifest's schema
(:data:`covidray.manifest.SCHEMA`) before it goes in, so that one odd value (``inf``, an integer
beyond int32, a 10 000-character name, a control character) becomes that row's error
(``bad_metadata``, with the column and the problem, never the value) instead of failing the
whole manifest after every image was decoded.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .labels import AGE_GROUPS, CLASSES, SUBTYPES

INT32_MAX = 2**31 - 1
MAX_TEXT = 256  # characters in a core text column
MAX_URI = 4096  # characters in a column that holds a path or URI (``source_uri``, ...)
MAX_EXTRA = 4096  # characters in an extra (verbatim) column
MAX_AGE = 130.0
MAX_STUDY_DAY = 36_525.0  # a century, either side of the reference day

_FLOATS: dict[str, tuple[float, float]] = {
    "age": (0.0, MAX_AGE),
    "study_day": (-MAX_STUDY_DAY, MAX_STUDY_DAY),
}
_INTS = ("width", "height", "orig_width", "orig_height")
_VOCAB: dict[str, tuple[str, ...]] = {
    "label": CLASSES,
    "subtype": SUBTYPES,
    "age_group": AGE_GROUPS,
}
_BOOLS = ("synthetic",)
_URIS = ("uri", "source_uri", "mask_uri")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # core columns: none at all
_CONTROL_EXTRA = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # extras: tab, CR, LF allowed


class BadMetadata(ValueError):
    """One column of a row is unusable; ``column`` and ``problem`` say which and why."""

    def __init__(self, column: str, problem: str) -> None:
        super().__init__(f"{column}: {problem}")
        self.column, self.problem = column, problem


def check_row(row: Mapping[str, Any], extra_columns: Iterable[str] = ()) -> None:
    """Raise :class:`BadMetadata` for the first unusable value of ``row`` (a manifest row or a
    layout's metadata for one file; absent and None values are fine)."""
    extras = set(extra_columns)
    for column, value in row.items():
        if value is None:
            continue
        if column in _FLOATS:
            _check_float(column, value, *_FLOATS[column])
        elif column in _INTS:
            _check_int(column, value)
        elif column in _BOOLS:
            if not isinstance(value, bool):
                raise BadMetadata(column, f"not a boolean ({type(value).__name__})")
        elif column in extras or column in _URIS:
            _check_text(column, value, MAX_EXTRA if column in extras else MAX_URI, _CONTROL_EXTRA)
        else:
            _check_text(column, value, MAX_TEXT, _CONTROL)
            if column in _VOCAB and value not in _VOCAB[column]:
                raise BadMetadata(column, f"not one of {_VOCAB[column]}")


def _number(column: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadMetadata(column, f"not a number ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number):
        raise BadMetadata(column, "not a finite number")
    return number


def _check_float(column: str, value: Any, low: float, high: float) -> None:
    number = _number(column, value)
    if not low <= number <= high:
        raise BadMetadata(column, f"outside [{low:g}, {high:g}]")


def _check_int(column: str, value: Any) -> None:
    number = _number(column, value)
    if number != int(number):
        raise BadMetadata(column, "not a whole number")
    if not 1 <= number <= INT32_MAX:
        raise BadMetadata(column, f"outside [1, {INT32_MAX}]")


def _check_text(column: str, value: Any, limit: int, control: re.Pattern[str]) -> None:
    if not isinstance(value, str):
        raise BadMetadata(column, f"not text ({type(value).__name__})")
    if len(value) > limit:
        raise BadMetadata(column, f"longer than {limit} characters")
    if control.search(value):
        raise BadMetadata(column, "contains a control character")
