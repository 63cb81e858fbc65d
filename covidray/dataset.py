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
from .codec import unit_to_u8_tensor
from .decode import decode_image
from .labels import CLASSES
from .manifest import SPLITS, manifest_base, read_manifest
from .preprocess import to_model_input

log = logging.getLogger(__name__)

GROUP_COLUMNS: tuple[str, ...] = ("source", "age_group", "view")
_ROW_COLUMNS = ("image_id", "uri", "label", "split", "patient_id", "synthetic", *GROUP_COLUMNS)


def _manifest_frame(uri: str) -> pd.DataFrame:
    """Labelled rows of the manifest at ``uri`` with absolute image URIs and a class index."""
    table = read_manifest(uri)
    df = table.to_pandas()
    for column in _ROW_COLUMNS:
        if column not in df.columns:
            df[column] = False if column == "synthetic" else None
    df = df[list(_ROW_COLUMNS)].copy()
    df = df[df["label"].isin(CLASSES)].reset_index(drop=True)
    base = manifest_base(uri)
    df["uri"] = [storage.resolve(base, u) for u in df["uri"]]
    df["y"] = [CLASSES.index(label) for label in df["label"]]
    df["source"] = df["source"].fillna("unknown").astype(str)
    return df


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


def training_data_hash(rows: pd.DataFrame) -> str:
    """sha256 over the sorted ``split, image_id, label`` lines of the train and val rows."""
    used = rows[rows["split"].isin(("train", "val"))]
    lines = sorted(
        f"{s}\t{i}\t{lab}"
        for s, i, lab in zip(used["split"], used["image_id"], used["label"], strict=True)
    )
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


READ_CHUNK = 64  # files fetched at once by load_images


def load_images(
    uris: list[str], size: int, progress: Callable[[int, int], None] | None = None
) -> torch.Tensor:
    """Read and decode each image once: ``N×1×size×size`` uint8 (squash resize, antialiased).

    Files are fetched ``READ_CHUNK`` at a time with :func:`covidray.storage.read_many`
    (concurrent GETs on S3); an unreadable file raises."""
    out = torch.empty((len(uris), 1, size, size), dtype=torch.uint8)
    for start in range(0, len(uris), READ_CHUNK):
        blobs = storage.read_many(uris[start : start + READ_CHUNK])
        for i, data in enumerate(blobs, start):
            if isinstance(data, BaseException):
                raise data
            out[i] = unit_to_u8_tensor(to_model_input(decode_image(data), size))
            if progress is not None:
                progress(i + 1, len(uris))
    return out


def shard_indices(n: int, rank: int, world_size: int, seed: int) -> np.ndarray:
    """This worker's rows of ``n``: a seeded permutation, dealt ``[rank::world_size]``."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[rank::world_size])
