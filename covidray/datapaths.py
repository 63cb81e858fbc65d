"""Paths read from a dataset's own metadata stay inside the dataset.

``manifest.csv``'s ``image`` and ``mask`` columns and ``manifest.parquet``'s ``uri`` are data:
whoever wrote the file chose them. :func:`resolve_inside` turns such a path into a URI under
the dataset's folder and refuses anything that could leave it: an absolute path, a URI (another
bucket, another scheme, the local disk from an S3 dataset) or ``..`` climbing above the folder.
``..`` that stays inside (``a/../b.png``) is allowed and collapsed.
"""

from __future__ import annotations

import posixpath
import re

from . import storage

# Reason codes (the row's error reason is ``bad_path``; these are its detail).
ABSOLUTE, URI, OTHER_BUCKET, CLIMBS, EMPTY, CONTROL = (
    "absolute path",
    "a URI, not a path relative to the dataset",
    "points into another bucket",
    "climbs out of the dataset with ..",
    "empty path",
    "control character in path",
)
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")  # C:\ or C:/
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class OutsideDataset(ValueError):
    """A path from data that would leave the dataset; ``reason`` says how (no path in it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def inside_path(rel: str) -> str:
    """``rel`` normalised (``/`` separators, ``.`` and inner ``..`` collapsed), or
    :class:`OutsideDataset` when it is not a path relative to the dataset that stays inside."""
    if not isinstance(rel, str) or not rel.strip():
        raise OutsideDataset(EMPTY)
    if _CONTROL.search(rel):
        raise OutsideDataset(CONTROL)
    if "://" in rel or rel.lower().startswith(("s3:", "s3a:", "file:")):
        raise OutsideDataset(URI)
    if rel.startswith(("/", "\\")) or _DRIVE.match(rel):
        raise OutsideDataset(ABSOLUTE)
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        raise OutsideDataset(CLIMBS)
    if norm in (".", ""):
        raise OutsideDataset(EMPTY)
    return norm


def resolve_inside(base: str, rel: str) -> str:
    """The URI of ``rel`` under the dataset folder ``base`` (local or ``s3://``); raises
    :class:`OutsideDataset` for a path that is absolute, a URI or climbs out of ``base``."""
    try:
        return storage.join(base, inside_path(rel))
    except OutsideDataset as err:
        if err.reason == URI and _bucket(rel) not in (None, _bucket(base)):
            raise OutsideDataset(OTHER_BUCKET) from None
        raise


def _bucket(uri: str) -> str | None:
    if uri.split("://", 1)[0].lower() not in ("s3", "s3a") or "://" not in uri:
        return None
    return uri.split("://", 1)[1].split("/", 1)[0]
