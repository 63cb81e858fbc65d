"""Training data: manifest rows per split, a decode-once uint8 image cache, balanced sampling.

Every worker reads the manifest from object storage itself. Train rows are shuffled with the
run's seed and dealt out ``rows[rank::world_size]``; each worker decodes only its shard, once,
into a ``N×1×S×S`` uint8 tensor (``S = input_size``, 50 KB per image at 224). Each epoch a
worker draws the same number of samples from its shard, with replacement and with weights that
balance classes (and sources within a class), from a generator seeded by (seed, epoch, rank):
an epoch's batches are the same whether or not the run was resumed.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from .. import storage
from ..decode import decode_image
from ..labels import CLASSES
from ..manifest import SPLITS, manifest_base, read_manifest
from ..preprocess import to_model_input, to_uint8

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
            out[i] = to_uint8(to_model_input(decode_image(data), size))
            if progress is not None:
                progress(i + 1, len(uris))
    return out


def shard_indices(n: int, rank: int, world_size: int, seed: int) -> np.ndarray:
    """This worker's rows of ``n``: a seeded permutation, dealt ``[rank::world_size]``."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[rank::world_size])


def sample_weights(
    labels: np.ndarray, sources: np.ndarray, mode: str, source_power: float = 0.5
) -> np.ndarray:
    """Per-row sampling weights (summing to 1) over the whole train set.

    ``none``: uniform. ``class``: each class the same total mass. ``class_source``: each class
    the same mass, split among its sources proportionally to ``n_source ** (1 - source_power)``
    (1: every source of a class equal; 0: same as ``class``), uniform within a source.
    """
    n = len(labels)
    if mode == "none":
        return np.full(n, 1.0 / n)
    w = np.zeros(n)
    classes = np.unique(labels)
    for c in classes:
        in_class = labels == c
        if mode == "class":
            w[in_class] = 1.0 / in_class.sum()
            continue
        if mode != "class_source":
            raise ValueError(f"unknown balance mode {mode!r}")
        srcs, counts = np.unique(sources[in_class], return_counts=True)
        mass = counts.astype(float) ** (1.0 - source_power)
        mass /= mass.sum()
        for s, m, k in zip(srcs, mass, counts, strict=True):
            w[in_class & (sources == s)] = m / k
    return w / w.sum()


class EpochSampler:
    """Per-worker sampling of its shard: same count for every worker (DDP needs equal steps)."""

    def __init__(
        self, weights: np.ndarray, n_total: int, world_size: int, batch_size: int, seed: int
    ) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.batch_size = batch_size
        self.seed = seed
        per_worker = math.ceil(n_total / world_size)
        self.steps = max(1, round(per_worker / batch_size))

    def batches(self, epoch: int, rank: int) -> list[torch.Tensor]:
        """Index batches (into the shard) for ``epoch``: ``steps`` full batches."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 1009 + rank)
        idx = torch.multinomial(
            self.weights, self.steps * self.batch_size, replacement=True, generator=g
        )
        return list(idx.split(self.batch_size))
