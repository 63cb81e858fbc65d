"""A dataset's labelled rows and its images decoded once, for training, evaluation and the GAN.

Every worker reads the manifest from object storage itself (:func:`load_rows`) and decodes only
the rows it needs, once, into a ``N×1×S×S`` uint8 tensor (:func:`load_images`; ``S`` the model's
input size, 100 KB per image at 320). :func:`shard_indices` deals a worker its rows.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from . import storage
from .config import DecodeConfig
from .datapaths import OutsideDataset, resolve_inside
from .decode import decode_array
from .labels import CLASSES, class_index
from .manifest import SPLITS, manifest_base, read_manifest
from .preprocess import prepare_array

log = logging.getLogger(__name__)

GROUP_COLUMNS: tuple[str, ...] = ("source", "age_group", "view")
_ROW_COLUMNS = (
    "image_id",
    "uri",
    "label",
    "split",
    "patient_id",
    "synthetic",
    "width",
    "height",
    *GROUP_COLUMNS,
)


def _manifest_frame(uri: str) -> pd.DataFrame:
    """Labelled rows of the manifest at ``uri`` with absolute image URIs and a class index."""
    table = read_manifest(uri)
    df = table.to_pandas()
    for column in _ROW_COLUMNS:
        if column not in df.columns:
            df[column] = False if column == "synthetic" else None
    df = df[list(_ROW_COLUMNS)].copy()
    df = df[df["label"].isin(CLASSES)].reset_index(drop=True)
    df["uri"] = _inside(manifest_base(uri), list(df["uri"]))
    df["y"] = [class_index(label) for label in df["label"]]
    df["source"] = df["source"].fillna("unknown").astype(str)
    return df


def _inside(base: str, rels: list[str]) -> list[str]:
    """The rows' image URIs under the dataset folder ``base``; a ValueError (how many rows,
    the first one's index and reason) if any path would leave it (:mod:`covidray.datapaths`)."""
    out, bad = [], []
    for i, rel in enumerate(rels):
        try:
            out.append(resolve_inside(base, rel))
        except OutsideDataset as err:
            bad.append((i, err.reason))
    if bad:
        raise ValueError(
            f"{len(bad)} labelled manifest row(s) name an image outside the dataset (row "
            f"{bad[0][0]}: {bad[0][1]}); paths in a manifest must be relative to its folder"
        )
    return out


def load_rows(data: str, augment_with: str | None = None) -> pd.DataFrame:
    """All labelled rows of ``data`` (columns: image_id, uri (absolute), label, y, split,
    patient_id, synthetic, source, age_group, view), plus ``augment_with``'s rows as TRAIN.

    Extra rows that derive from a val/test image (``source_image_id``) or share a patient with
    val/test are dropped, so synthetic augmentation cannot leak evaluation images.
    """
    df = _manifest_frame(data)
    df = df[df["split"].isin(SPLITS)].reset_index(drop=True)
    if augment_with:
        extra = _manifest_frame(augment_with)
        table = read_manifest(augment_with)
        derived = (
            table.column("source_image_id").to_pylist()
            if "source_image_id" in table.schema.names
            else [None] * table.num_rows
        )
        labelled = [lab in CLASSES for lab in table.column("label").to_pylist()]
        extra["source_image_id"] = [d for d, keep in zip(derived, labelled, strict=True) if keep]
        held_out = df[df["split"] != "train"]
        leaks = extra["source_image_id"].isin(set(held_out["image_id"])) | extra["patient_id"].isin(
            set(held_out["patient_id"])
        )
        if leaks.any():
            log.warning("augment_with: dropped %d rows tied to val/test images", int(leaks.sum()))
        extra = extra[~leaks & ~extra["image_id"].isin(set(df["image_id"]))]
        extra = extra.drop(columns=["source_image_id"]).assign(split="train")
        df = pd.concat([df, extra], ignore_index=True)
    return df


def load_view_rows(data: str) -> pd.DataFrame:
    """Every row of ``data`` whose ``view`` is stated, labelled or not (a view dataset such as
    the ingested ``../shared/data/views``): columns image_id, uri (absolute), patient_id,
    view. The view check's training data (:func:`covidray.posthoc.fit_outputs`)."""
    df = read_manifest(data).to_pandas()
    if "view" not in df.columns:
        raise ValueError(f"{data}: no view column, so no view labels for the view check")
    df = df[df["view"].notna() & (df["view"].astype(str).str.strip() != "")]
    df = df[["image_id", "uri", "patient_id", "view"]].reset_index(drop=True)
    if df.empty:
        raise ValueError(f"{data}: no row states its view")
    df["uri"] = _inside(manifest_base(data), list(df["uri"]))
    df["patient_id"] = df["patient_id"].fillna("unknown").astype(str)
    return df


def training_data_hash(rows: pd.DataFrame) -> str:
    """sha256 over the sorted ``split, image_id, label`` lines of the train and val rows."""
    used = rows[rows["split"].isin(("train", "val"))]
    lines = sorted(
        f"{s}\t{i}\t{lab}"
        for s, i, lab in zip(used["split"], used["image_id"], used["label"], strict=True)
    )
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


READ_CHUNK = 64  # files fetched at once by load_images


def shorter_side(rows: pd.DataFrame) -> int:
    """The shorter side the rows' images were ingested at; refuses a mix, which one model
    cannot be trained on (its card records one normalisation for every input)."""
    sides = pd.concat([rows["width"], rows["height"]], axis=1).min(axis=1).dropna()
    found = sorted({int(v) for v in sides})
    if len(found) != 1:
        raise ValueError(
            f"the images were ingested at shorter sides {found or 'unknown'}: one model needs "
            "one; re-ingest them with the same --size"
        )
    return found[0]


def load_images(
    uris: list[str],
    size: int,
    progress: Callable[[int, int], None] | None = None,
    *,
    shorter_side: int | None = None,
    max_bytes: int = DecodeConfig().max_bytes,
    contrast: str = "none",
) -> torch.Tensor:
    """Read and decode each image once: ``N×1×size×size`` uint8 through the one preprocessing
    path (:func:`covidray.preprocess.prepare_array`; ``shorter_side`` None: the files are
    ingest's output already; ``contrast``: the model input's contrast normalisation).

    Files are fetched ``READ_CHUNK`` at a time with :func:`covidray.storage.read_many`
    (concurrent GETs on S3), each one's size checked before its bytes are fetched; an
    unreadable file, or one larger than ``max_bytes`` (:class:`covidray.storage.TooLarge`),
    raises."""
    out = torch.empty((len(uris), 1, size, size), dtype=torch.uint8)
    for start in range(0, len(uris), READ_CHUNK):
        blobs = storage.read_many(uris[start : start + READ_CHUNK], max_bytes=max_bytes)
        for i, data in enumerate(blobs, start):
            if isinstance(data, BaseException):
                raise data
            out[i, 0] = torch.from_numpy(
                prepare_array(decode_array(data), size, shorter_side, contrast)
            )
            if progress is not None:
                progress(i + 1, len(uris))
    return out


def shard_indices(n: int, rank: int, world_size: int, seed: int) -> np.ndarray:
    """This worker's rows of ``n``: a seeded permutation, dealt ``[rank::world_size]``."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[rank::world_size])
