"""Recognise the folder layouts that public and hospital X-ray collections come in.

Each layout turns a source folder (local or S3) into a list of :class:`SourceItem`: one raw
file to decode, with whatever the layout's metadata says about it. Rows the layout's own
metadata excludes (a lateral view, a finding outside the three classes, a listed file that
is missing) are returned as :class:`Skipped`, so that nothing vanishes without a reason.
"""

from __future__ import annotations

import csv
import io
import math
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import storage
from .config import LAYOUTS
from .datapaths import OutsideDataset, resolve_inside
from .labels import FOLDER_NAMES, normalize_label, normalize_subtype
from .manifest import CSV_METADATA_COLUMNS, CSV_NAME, CSV_PATH_COLUMNS
from .sidecars import is_sidecar


@dataclass
class SourceItem:
    """One raw input file and the metadata its layout gives it."""

    uri: str
    meta: dict[str, Any] = field(default_factory=dict)  # manifest columns known up front
    extras: dict[str, Any] = field(default_factory=dict)  # unknown columns, kept verbatim
    mask_uri: str | None = None  # lesion mask to carry along (phantoms)
    from_dicom: bool = False  # fill patient, view, age, sex and date from the DICOM header


@dataclass
class Skipped:
    source_uri: str
    reason: str
    detail: str


@dataclass
class Layout:
    name: str
    items: list[SourceItem]
    skipped: list[Skipped]
    extra_columns: list[str]


class LayoutError(ValueError):
    """The source folder matches no known layout, or its metadata is unusable."""


def _rel(src: str, uri: str) -> str:
    src_path = storage.filesystem(src)[1]
    path = storage.filesystem(uri)[1]
    return posixpath.relpath(path.replace("\\", "/"), src_path.replace("\\", "/"))


def _blank(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or str(value).strip()
        in (
            "",
            "nan",
            "NaN",
            "None",
        )
    )


def _float(value: Any) -> float | None:
    if _blank(value):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _str(value: Any) -> str | None:
    return None if _blank(value) else str(value).strip()


def _age_group(age: float | None) -> str | None:
    if age is None:
        return None
    return "child" if age < 18 else "adult"


def _read_csv(uri: str) -> list[dict[str, str]]:
    text = storage.read_bytes(uri).decode("utf-8-sig")
    return list(csv.DictReader(io.StringIO(text)))


# --- Kaggle file names ------------------------------------------------------------------------

_KAGGLE_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_KAGGLE_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)", re.IGNORECASE)


def kaggle_patient(filename: str) -> str | None:
    """``person12_virus_3.jpeg`` → ``person12``; ``IM-0847-0001.jpeg`` → ``IM-0847``."""
    stem = posixpath.basename(filename)
    m = _KAGGLE_PERSON.match(stem) or _KAGGLE_NORMAL.match(stem)
    return m.group(1) if m else None


def subtype_from_name(filename: str) -> str | None:
    name = posixpath.basename(filename).lower()
    if "virus" in name or "viral" in name:
        return "viral"
    if "bacteria" in name:
        return "bacterial"
    return None


# --- (a) one folder per class -----------------------------------------------------------------


def _class_folders(src: str, files: list[str]) -> Layout:
    source = storage.basename(src) or "folder"
    items, skipped = [], []
    for uri in files:
        parts = _rel(src, uri).split("/")
        mapped = FOLDER_NAMES.get(parts[0].lower()) if len(parts) > 1 else None
        if mapped is None:
            skipped.append(Skipped(uri, "outside_class_folders", "not inside a class folder"))
            continue
        label, subtype = mapped
        if label == "pneumonia":
            subtype = subtype_from_name(uri) or subtype
        stem = posixpath.splitext(parts[-1])[0]
        patient = kaggle_patient(parts[-1]) or stem
        items.append(
            SourceItem(
                uri,
                meta={
                    "label": label,
                    "subtype": subtype,
                    "patient_id": f"{source}:{patient}",
                    "source": source,
                },
            )
        )
    return Layout("class-folders", items, skipped, [])


# --- (b) manifest.csv -------------------------------------------------------------------------


def _manifest_csv(src: str, files: list[str]) -> Layout:
    manifest_uri = storage.join(src, CSV_NAME)
    rows = _read_csv(manifest_uri)
    if not rows:
        raise LayoutError(f"{manifest_uri} has no rows")
    columns = list(rows[0].keys())
    path_col = next((c for c in CSV_PATH_COLUMNS if c in columns), None)
    if path_col is None:
        raise LayoutError(f"{manifest_uri}: needs one of the columns {CSV_PATH_COLUMNS}")
    extra_columns = [
        c for c in columns if c != path_col and c not in CSV_METADATA_COLUMNS and c != "split"
    ]
    if "split" in columns:
        extra_columns.append("source_split")
    present = set(files)
    default_source = storage.basename(src) or "manifest"
    items, skipped = [], []
    for i, row in enumerate(rows, start=2):
        rel = _str(row.get(path_col))
        if rel is None:
            skipped.append(Skipped(f"{manifest_uri}#L{i}", "bad_metadata", "empty image path"))
            continue
        try:  # paths from the file stay inside the dataset
            uri = resolve_inside(src, rel)
        except OutsideDataset as err:
            where = f"{manifest_uri}#L{i}"
            skipped.append(Skipped(where, "bad_path", f"{path_col}: {err.reason}"))
            continue
        if uri not in present:
            skipped.append(Skipped(uri, "missing_file", f"listed in manifest.csv line {i}"))
            continue
        try:
            label = normalize_label(row.get("label"))
            subtype = normalize_subtype(row.get("subtype"), label)
        except ValueError as err:
            skipped.append(Skipped(uri, "bad_metadata", str(err)))
            continue
        patient = _str(row.get("patient_id"))
        source = _str(row.get("source")) or (
            patient.split(":", 1)[0] if patient and ":" in patient else default_source
        )
        if patient is None:
            patient = f"{source}:{posixpath.splitext(posixpath.basename(rel))[0]}"
        age = _float(row.get("age"))
        extras = {c: _str(row.get(c)) for c in extra_columns if c in row}
        if "split" in row:
            extras["source_split"] = _str(row.get("split"))
        mask = _str(row.get("mask"))
        try:
            mask_uri = resolve_inside(src, mask) if mask else None
        except OutsideDataset as err:
            skipped.append(Skipped(f"{manifest_uri}#L{i}", "bad_path", f"mask: {err.reason}"))
            continue
        items.append(
            SourceItem(
                uri,
                meta={
                    "label": label,
                    "subtype": subtype,
                    "patient_id": patient,
                    "view": _str(row.get("view")),
                    "age_group": _str(row.get("age_group")) or _age_group(age),
                    "age": age,
                    "sex": _str(row.get("sex")),
                    "study_day": _float(row.get("study_day")),
                    "study_date": _str(row.get("study_date")),
                    "source": source,
                    "source_repo": _str(row.get("source_repo")),
                    "orig_width": _float(row.get("orig_width")),
                    "orig_height": _float(row.get("orig_height")),
                },
                extras=extras,
                mask_uri=mask_uri,
            )
        )
    return Layout("manifest", items, skipped, extra_columns)


# --- (c) ieee8023/covid-chestxray-dataset metadata.csv ---------------------------------------

_FRONTAL = {"pa", "ap", "ap supine", "ap semi erect", "ap erect", "ap lordotic"}
_BACTERIA = (
    "bacterial",
    "streptococcus",
    "klebsiella",
    "legionella",
    "chlamydophila",
    "e.coli",
    "mycoplasma",
    "staphylococcus",
    "nocardia",
    "pseudomonas",
    "haemophilus",
)
_VIRUS = ("viral", "sars", "mers", "varicella", "influenza", "herpes", "rsv")


def ieee8023_finding(finding: str) -> tuple[str, str] | None:
    """Map an ieee8023 ``finding`` onto (label, subtype); None for findings outside the classes."""
    f = finding.strip().lower()
    if "covid" in f:
        return ("covid", "covid19")
    if f in ("no finding", "normal"):
        return ("normal", "normal")
    if any(b in f for b in _BACTERIA):
        return ("pneumonia", "bacterial")
    if any(v in f for v in _VIRUS):
        return ("pneumonia", "viral")
    if f in ("pneumonia", "pneumonia/unknown"):
        return ("pneumonia", "unknown")
    return None


def _ieee8023(src: str, files: list[str]) -> Layout:
    meta_uri = storage.join(src, "metadata.csv")
    rows = _read_csv(meta_uri)
    present = set(files)
    items, skipped = [], []
    for i, row in enumerate(rows, start=2):
        folder = _str(row.get("folder")) or "images"
        name = _str(row.get("filename"))
        if name is None:
            skipped.append(Skipped(f"{meta_uri}#L{i}", "bad_metadata", "empty filename"))
            continue
        try:
            uri = resolve_inside(src, f"{folder}/{name}")
        except OutsideDataset as err:
            skipped.append(Skipped(f"{meta_uri}#L{i}", "bad_path", f"filename: {err.reason}"))
            continue
        modality = (_str(row.get("modality")) or "X-ray").lower()
        view = _str(row.get("view"))
        if modality not in ("x-ray", "xray", "cr", "dx"):
            skipped.append(Skipped(uri, "excluded_modality", f"modality {modality}"))
            continue
        if view is None or view.lower() not in _FRONTAL:
            skipped.append(Skipped(uri, "excluded_view", f"view {view!r} is not frontal"))
            continue
        mapped = ieee8023_finding(_str(row.get("finding")) or "")
        if mapped is None:
            skipped.append(Skipped(uri, "excluded_finding", f"finding {row.get('finding')!r}"))
            continue
        if uri not in present:
            skipped.append(Skipped(uri, "missing_file", f"listed in metadata.csv line {i}"))
            continue
        age = _float(row.get("age"))
        label, subtype = mapped
        items.append(
            SourceItem(
                uri,
                meta={
                    "label": label,
                    "subtype": subtype,
                    "patient_id": f"ieee8023:{_str(row.get('patientid'))}",
                    "view": "AP" if view.lower() == "ap erect" else view,
                    "age_group": _age_group(age),
                    "age": age,
                    "sex": _str(row.get("sex")),
                    "study_day": _float(row.get("offset")),
                    "study_date": _str(row.get("date")),
                    "source": "ieee8023",
                    "source_repo": "ieee8023/covid-chestxray-dataset",
                },
                extras={"finding": _str(row.get("finding"))},
            )
        )
    return Layout("ieee8023", items, skipped, ["finding"])


# --- (d) Kaggle chest_xray/{train,test,val}/{NORMAL,PNEUMONIA} -------------------------------

_KAGGLE_DIR = re.compile(r"(?:^|/)(train|test|val)/(NORMAL|PNEUMONIA)/", re.IGNORECASE)


def _kaggle(src: str, files: list[str]) -> Layout:
    items, skipped = [], []
    for uri in files:
        rel = _rel(src, uri)
        m = _KAGGLE_DIR.search(rel)
        if m is None or "__macosx" in rel.lower():
            skipped.append(
                Skipped(
                    uri, "outside_class_folders", "not under {train,test,val}/{NORMAL,PNEUMONIA}"
                )
            )
            continue
        label = m.group(2).lower()
        subtype = "normal" if label == "normal" else (subtype_from_name(uri) or "unknown")
        name = posixpath.basename(uri)
        patient = kaggle_patient(name) or posixpath.splitext(name)[0]
        items.append(
            SourceItem(
                uri,
                meta={
                    "label": label,
                    "subtype": subtype,
                    "patient_id": f"kaggle:{patient}",
                    "age_group": "child",
                    "source": "kaggle",
                    "source_repo": "kaggle/chest-xray-pneumonia",
                },
                extras={"source_split": m.group(1).lower()},
            )
        )
    return Layout("kaggle", items, skipped, ["source_split"])


# --- (e) a folder of DICOM files --------------------------------------------------------------


def _dicom(src: str, files: list[str], labels_uri: str | None) -> Layout:
    labels: dict[str, tuple[str | None, str | None]] = {}
    if labels_uri:
        for row in _read_csv(labels_uri):
            key = _str(row.get("file") or row.get("image") or row.get("path"))
            if key:
                label = normalize_label(row.get("label"))
                labels[key] = (label, normalize_subtype(row.get("subtype"), label))
    source = storage.basename(src) or "dicom"
    items = []
    for uri in files:
        rel = _rel(src, uri)
        label, subtype = labels.get(rel) or labels.get(posixpath.basename(rel)) or (None, None)
        items.append(
            SourceItem(
                uri,
                meta={"label": label, "subtype": subtype, "source": source},
                from_dicom=True,
            )
        )
    return Layout("dicom", items, [], [])


# --- detection --------------------------------------------------------------------------------


def _looks_dicom(files: list[str]) -> bool:
    from .decode import is_dicom

    sample = files[:16]
    if not sample:
        return False
    hits = 0
    for uri in sample:
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as f:
            hits += is_dicom(f.read(132))
    return hits * 2 > len(sample)


def detect(src: str, files: list[str]) -> str:
    """Name the layout of ``src`` from its files."""
    rels = [_rel(src, u) for u in files]
    top = set(rels)
    if "manifest.csv" in top:
        return "manifest"
    if "metadata.csv" in top:
        header = storage.read_bytes(storage.join(src, "metadata.csv"))[:4096].decode(
            "utf-8", "replace"
        )
        if "finding" in header.splitlines()[0].lower():
            return "ieee8023"
    if any(_KAGGLE_DIR.search(r) for r in rels):
        return "kaggle"
    folders = {r.split("/", 1)[0].lower() for r in rels if "/" in r}
    if folders & set(FOLDER_NAMES):
        return "class-folders"
    if _looks_dicom(files):
        return "dicom"
    raise LayoutError(
        f"cannot tell the layout of {src}: expected class folders, manifest.csv, an ieee8023 "
        "metadata.csv, Kaggle chest_xray/{train,test,val}/{NORMAL,PNEUMONIA} or DICOM files"
    )


def scan(src: str, layout: str = "auto", labels_uri: str | None = None) -> Layout:
    """List ``src`` and build its items under the given (or detected) layout."""
    src = storage.normalize(src)
    files = storage.walk_files(src)
    name = detect(src, files) if layout == "auto" else layout
    metadata = {storage.join(src, n) for n in ("manifest.csv", "metadata.csv")}
    # Notes and metadata beside the images (covidray.sidecars) are neither inputs nor errors.
    data_files = [u for u in files if u not in metadata and u != labels_uri and not is_sidecar(u)]
    builders: dict[str, Callable[[], Layout]] = {
        "class-folders": lambda: _class_folders(src, data_files),
        "manifest": lambda: _manifest_csv(src, data_files),
        "ieee8023": lambda: _ieee8023(src, data_files),
        "kaggle": lambda: _kaggle(src, data_files),
        "dicom": lambda: _dicom(src, data_files, labels_uri),
    }
    if name not in builders:
        raise LayoutError(f"unknown layout {name!r}; choose one of {LAYOUTS}")
    return builders[name]()
