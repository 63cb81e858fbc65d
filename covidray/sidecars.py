"""Files that sit beside images in a source folder and are never images: notes, metadata,
tables, operating-system leftovers. Ingest's layouts and the nightly job's prefix listing skip
them without an error row; anything else that is not an image still gets one."""

from __future__ import annotations

import posixpath

SIDECAR_SUFFIXES = (
    ".csv", ".tsv", ".parquet", ".json", ".md", ".txt", ".rtf", ".xml", ".xmp",
    ".yaml", ".yml", ".html", ".htm", ".ini", ".log",
)  # fmt: skip
SIDECAR_NAMES = ("thumbs.db", "desktop.ini")  # Windows' folder leftovers


def is_sidecar(uri: str, suffixes: tuple[str, ...] = SIDECAR_SUFFIXES) -> bool:
    """True for a hidden file (``.DS_Store``, ``._x.png``), a known leftover, or a name ending
    in one of ``suffixes`` (case-insensitive)."""
    name = posixpath.basename(uri.replace("\\", "/")).lower()
    lowered = tuple(s.lower() for s in suffixes)
    return name.startswith(".") or name in SIDECAR_NAMES or name.endswith(lowered)
