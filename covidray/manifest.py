"""The dataset manifest: its Parquet schema, reading and writing, and the patient-level split."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from . import storage
from .config import SplitConfig

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Core columns, in order. Sources may add further (string) columns; those are kept after these.
SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # sha256 of the raw input bytes
        pa.field("uri", pa.string(), nullable=False),  # normalized image, relative to the manifest
        pa.field("label", pa.string()),  # covid | pneumonia | normal | null (unlabelled)
        pa.field("subtype", pa.string()),  # covid19 | viral | bacterial | unknown | normal
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("view", pa.string()),  # DICOM ViewPosition where the source had one
        pa.field("modality", pa.string()),  # DICOM Modality (the input gate's metadata layer)
        pa.field("body_part", pa.string()),  # DICOM BodyPartExamined (likewise)
        pa.field("age_group", pa.string()),  # child | adult | null
        pa.field("age", pa.float32()),
        pa.field("sex", pa.string()),
        pa.field("study_day", pa.float32()),  # offset in days, where known
        pa.field("study_date", pa.string()),  # ISO date, where known
        pa.field("source", pa.string(), nullable=False),  # originating dataset
        pa.field("source_repo", pa.string()),
        pa.field("source_uri", pa.string()),  # where the raw input was read
        pa.field("split", pa.string()),  # train | val | test | null (unlabelled)
        pa.field("synthetic", pa.bool_(), nullable=False),  # made by a generator (CycleGAN)
        pa.field("source_image_id", pa.string()),  # for synthetic rows: the translated input
        pa.field("generator_version", pa.string()),  # for synthetic rows
        pa.field("mask_uri", pa.string()),  # lesion mask (phantoms), relative to the manifest
        pa.field("width", pa.int32(), nullable=False),  # of the stored image
        pa.field("height", pa.int32(), nullable=False),
        pa.field("orig_width", pa.int32()),
        pa.field("orig_height", pa.int32()),
    ]
)
CORE_COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("image_id", pa.string()),
    ]
)

MANIFEST_NAME = "manifest.parquet"
ERRORS_NAME = "errors.parquet"

# manifest.csv: the labelled-folder input layout (``../shared/data/cxr``, the phantoms) that
# synth writes and the ingest layout reads. The file column comes first; readers also accept
# the other names in CSV_PATH_COLUMNS for it. Unknown columns are kept as extras.
CSV_NAME = "manifest.csv"
CSV_COLUMNS: tuple[str, ...] = (
    "image",
    "label",
    "subtype",
    "patient_id",
    "view",
    "age_group",
    "age",
    "sex",
    "study_day",
    "study_date",
    "source",
    "source_repo",
    "mask",
    "orig_width",
    "orig_height",
)
CSV_PATH_COLUMNS: tuple[str, ...] = ("image", "path", "file", "filename", "uri")
CSV_METADATA_COLUMNS: frozenset[str] = frozenset(CSV_COLUMNS[1:])


def image_path(image_id: str) -> str:
    """Where a normalized image lives, relative to the dataset folder."""
    return f"images/{image_id[:2]}/{image_id}.png"


def mask_path(image_id: str) -> str:
    """Where a normalized lesion mask lives, relative to the dataset folder."""
    return f"masks/{image_id[:2]}/{image_id}.png"


def to_table(rows: Sequence[Mapping[str, Any]], extra_columns: Iterable[str] = ()) -> pa.Table:
    """Rows (dicts) → a manifest table: core columns typed, extra columns as strings."""
    extras = [c for c in dict.fromkeys(extra_columns) if c not in CORE_COLUMNS]
    fields = list(SCHEMA) + [pa.field(c, pa.string()) for c in extras]
    schema = pa.schema(fields)
    columns = {}
    for field in fields:
        values = [row.get(field.name) for row in rows]
        if field.name in extras:
            values = [None if v is None else str(v) for v in values]
        if field.name == "synthetic":
            values = [bool(v) for v in values]
        columns[field.name] = pa.array(values, type=field.type)
    return pa.Table.from_pydict(columns, schema=schema)


def errors_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([dict(r) for r in rows], schema=ERRORS_SCHEMA)


def read_manifest(uri: str) -> pa.Table:
    """Read a manifest (a ``manifest.parquet`` file or the folder holding it)."""
    if not uri.endswith(".parquet"):
        uri = storage.join(uri, MANIFEST_NAME)
    table = storage.read_parquet(uri)
    missing = [
        c
        for c in ("image_id", "uri", "label", "patient_id", "split")
        if c not in table.schema.names
    ]
    if missing:
        raise ValueError(f"{uri} is not a covidray manifest (missing columns {missing})")
    return table


def manifest_base(uri: str) -> str:
    """The folder that relative ``uri`` values of the manifest at ``uri`` are relative to."""
    return storage.parent(uri) if uri.endswith(".parquet") else uri


def split_by_patient(
    patient_ids: Sequence[str],
    labels: Sequence[str | None],
    strata: Sequence[Sequence[Any]] | None = None,
    config: SplitConfig = SplitConfig(),
    known: Mapping[str, str] | None = None,
) -> list[str | None]:
    """Assign each labelled row to train/val/test so that no patient is in two splits and no
    patient ever moves as the data grows.

    A patient listed in ``known`` (the splits of a manifest already written) keeps that split.
    Every other patient draws a number in [0, 1) from a keyed hash (HMAC-SHA256, keyed by
    ``config.seed``) of its stratum (by default the label and age group of its first labelled
    row) and its id, and falls in the split whose share of [0, 1) holds it
    (``config.fractions``). The draw depends on nothing but the patient: adding patients,
    re-ordering rows or ingesting again never changes another patient's split, so a test
    image of one model version cannot become a training image of the next. Unlabelled rows
    get ``None``. Per stratum the shares are met on average, not exactly.
    """
    known = known or {}
    n = len(patient_ids)
    strata = strata if strata is not None else [() for _ in range(n)]
    patient_stratum: dict[str, tuple] = {}
    for pid, label, stratum in zip(patient_ids, labels, strata, strict=True):
        if label is None:
            continue
        key = (label, *tuple("" if s is None else str(s) for s in stratum))
        # A patient with rows of several strata is placed by its smallest stratum key.
        patient_stratum[pid] = min(patient_stratum.get(pid, key), key)
    edges = np.cumsum(np.asarray(config.fractions, dtype=float))
    secret = f"covidray-split-{config.seed}".encode()
    assignment: dict[str, str] = {}
    for pid, key in patient_stratum.items():
        if known.get(pid) in SPLITS:
            assignment[pid] = known[pid]
            continue
        message = "\x1f".join((*key, pid)).encode("utf-8")
        draw = int.from_bytes(hmac.new(secret, message, hashlib.sha256).digest()[:8], "big")
        u = draw / 2**64
        assignment[pid] = SPLITS[min(int(np.searchsorted(edges, u, side="right")), len(SPLITS) - 1)]
    return [
        assignment.get(pid) if label is not None else None
        for pid, label in zip(patient_ids, labels, strict=True)
    ]
