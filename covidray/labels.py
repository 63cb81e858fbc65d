"""The class vocabulary: labels, subtypes and how folder or finding names map onto them."""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("covid", "pneumonia", "normal")
SUBTYPES: tuple[str, ...] = ("covid19", "viral", "bacterial", "unknown", "normal")
AGE_GROUPS: tuple[str, ...] = ("child", "adult")

DEFAULT_SUBTYPE = {"covid": "covid19", "pneumonia": "unknown", "normal": "normal"}

# Folder names seen in public layouts (lower-cased) -> (label, subtype).
FOLDER_NAMES: dict[str, tuple[str, str]] = {
    "covid": ("covid", "covid19"),
    "covid19": ("covid", "covid19"),
    "covid-19": ("covid", "covid19"),
    "covid_19": ("covid", "covid19"),
    "pneumonia": ("pneumonia", "unknown"),
    "viral": ("pneumonia", "viral"),
    "viral pneumonia": ("pneumonia", "viral"),
    "viral_pneumonia": ("pneumonia", "viral"),
    "bacterial": ("pneumonia", "bacterial"),
    "bacterial pneumonia": ("pneumonia", "bacterial"),
    "bacterial_pneumonia": ("pneumonia", "bacterial"),
    "normal": ("normal", "normal"),
    "no_findings": ("normal", "normal"),
    "no finding": ("normal", "normal"),
    "no_finding": ("normal", "normal"),
}


def class_index(label: str) -> int:
    """The position of ``label`` in :data:`CLASSES` (a model's output index)."""
    return CLASSES.index(check_class(label))


def check_class(label: str) -> str:
    """``label`` if it is one of :data:`CLASSES`, else a ValueError listing them."""
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASSES}")
    return label


def normalize_label(label: str | None) -> str | None:
    """Map a label string onto CLASSES; empty means unlabelled (None)."""
    if label is None:
        return None
    key = str(label).strip().lower()
    if not key or key == "nan":
        return None
    if key in CLASSES:
        return key
    if key in FOLDER_NAMES:
        return FOLDER_NAMES[key][0]
    raise ValueError(f"unknown label {label!r}; expected one of {CLASSES}")


def normalize_subtype(subtype: str | None, label: str | None) -> str | None:
    """Map a subtype onto SUBTYPES, defaulting from the label."""
    if label is None:
        return None
    key = (subtype or "").strip().lower()
    if not key or key == "nan":
        return DEFAULT_SUBTYPE[label]
    if key in ("virus",):
        key = "viral"
    if key in ("bacteria",):
        key = "bacterial"
    if key in ("covid", "covid-19"):
        key = "covid19"
    if key not in SUBTYPES:
        raise ValueError(f"unknown subtype {subtype!r}; expected one of {SUBTYPES}")
    return key
