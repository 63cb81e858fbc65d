"""`covidray ingest SRC DEST`: raw X-ray folders → normalized PNGs + ``manifest.parquet``.

Every input file ends up either as a manifest row or as a row of ``errors.parquet`` with a
reason code (decode failures, files the layout's metadata excludes, exact duplicates), so
nothing is lost without a trace. Large inputs are decoded in parallel Ray tasks.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel

from . import storage
from .codec import FAST_PNG, encode_png, unit_to_u8
from .config import PSEUDONYM_KEY_ENV, IngestConfig, secret_bytes
from .decode import DecodeError, decode_array, is_dicom
from .dicom_meta import dicom_tags
from .heldout import hold_out, refuse_stored_splits, with_held_out
from .layouts import Layout, SourceItem, scan
from .manifest import (
    ERRORS_NAME,
    MANIFEST_NAME,
    errors_table,
    image_path,
    mask_path,
    read_manifest,
    split_by_patient,
    to_table,
)
from .preprocess import resize_shorter_side
from .pseudonyms import patient_pseudonym, pseudonymize, safe_detail, shift_date, source_ref
from .rowcheck import BadMetadata, check_row

log = logging.getLogger(__name__)

# Extra columns a layout fills itself (not copied from the source's metadata).
LAYOUT_EXTRAS = frozenset({"source_split", "finding"})

Progress = Callable[[int, int], None]  # (done, total)


class IngestResult(BaseModel):
    """What an ingest wrote, for the CLI's summary table and for callers."""

    layout: str
    manifest_uri: str
    errors_uri: str
    n_inputs: int
    n_rows: int
    n_errors: int
    n_duplicates: int
    counts: dict[str, dict[str, int]]  # label → split → images
    error_reasons: dict[str, int]
    n_skipped: int = 0  # DICOMweb: instances the dataset held already (not retrieved again)
    n_retry: int = 0  # DICOMweb: of the errors, retrievals tried again by the next pull
    not_retrieved: dict[str, int] = {}  # DICOMweb: other objects (SR, SC, CT...) by modality


class Rejected(Exception):
    """A file refused for a reason of ingest's own (size, pseudonym key, mask)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _error(item: SourceItem, reason: str, detail: str, image_id: str | None) -> dict[str, Any]:
    return {
        "error": {"source_uri": item.uri, "reason": reason, "detail": detail, "image_id": image_id}
    }


def _ingest_one(
    item: SourceItem, dest: str, cfg: IngestConfig, key: bytes | None
) -> dict[str, Any]:
    """Read, decode, normalize and store one file: ``{"row": ...}`` or ``{"error": ...}``."""
    try:
        check_row({**item.meta, **item.extras}, item.extras)  # before any byte is read
        if storage.size(item.uri) > cfg.decode.max_bytes:
            raise Rejected("too_large", f"file larger than {cfg.decode.max_bytes} bytes")
        data = storage.read_bytes(item.uri)
    except Exception as err:
        return failure_record(item, err, None, key)
    return ingest_bytes(item, data, hashlib.sha256(data).hexdigest(), dest, cfg, key)


def ingest_bytes(
    item: SourceItem,
    data: bytes,
    image_id: str,
    dest: str,
    cfg: IngestConfig,
    key: bytes | None,
) -> dict[str, Any]:
    """Decode, pseudonymize and store one input's bytes under ``image_id``: ``{"row": ...}``
    or ``{"error": ...}`` (the one path of every ingested image, from a folder or an
    archive)."""
    try:
        image = decode_array(data, max_pixels=cfg.decode.max_pixels)
        meta = dict(item.meta)
        if item.from_dicom and is_dicom(data):
            tags = dicom_tags(data)
            raw_pid = tags.get("patient_id")
            if raw_pid and key is None:
                raise Rejected(
                    "no_pseudonym_key", "DICOM PatientID present but no pseudonym key configured"
                )
            patient = pseudonymize(raw_pid, key) if raw_pid else image_id[:20]
            meta.update(
                patient_id=f"dicom:{patient}",
                view=tags.get("view"),
                modality=tags.get("modality"),
                body_part=tags.get("body_part"),
                age=tags.get("age"),
                sex=tags.get("sex"),
                study_date=tags.get("study_date"),
                age_group=None
                if tags.get("age") is None
                else ("child" if tags["age"] < 18 else "adult"),
            )
        elif item.from_dicom:
            meta.setdefault("patient_id", f"{meta['source']}:{image_id[:20]}")
        if key is not None:  # keyed: the layout's patient id too, and dates shifted per patient
            if not item.from_dicom:  # DICOM's is keyed above
                meta["patient_id"] = patient_pseudonym(str(meta["patient_id"]), key)
            meta["study_date"] = shift_date(meta.get("study_date"), meta["patient_id"], key)
        check_row(meta)  # with the DICOM header's fields
        orig_h, orig_w = image.shape
        stored = unit_to_u8(resize_shorter_side(image, cfg.size))
        storage.write_bytes(
            storage.join(dest, image_path(image_id)), encode_png(stored, compress_level=FAST_PNG)
        )
        row: dict[str, Any] = {
            **meta,
            **item.extras,
            "image_id": image_id,
            "uri": image_path(image_id),
            "source_uri": item.uri,
            "synthetic": False,
            "width": stored.shape[1],
            "height": stored.shape[0],
            "orig_width": int(meta.get("orig_width") or orig_w),
            "orig_height": int(meta.get("orig_height") or orig_h),
        }
        if item.mask_uri:
            mask_bytes = storage.read_bytes(item.mask_uri, max_bytes=cfg.decode.max_bytes)
            mask = decode_array(mask_bytes, max_pixels=cfg.decode.max_pixels)
            if mask.shape != (orig_h, orig_w):
                raise Rejected("bad_mask", f"mask is {mask.shape[::-1]}, image {(orig_w, orig_h)}")
            small = Image.fromarray(unit_to_u8(mask > 0.5), mode="L").resize(
                (stored.shape[1], stored.shape[0]), Image.Resampling.NEAREST
            )
            storage.write_bytes(
                storage.join(dest, mask_path(image_id)),
                encode_png(np.asarray(small, np.uint8), compress_level=FAST_PNG),
            )
            row["mask_uri"] = mask_path(image_id)
        return {"row": row}
    except Exception as err:
        return failure_record(item, err, image_id, key)


def failure_record(
    item: SourceItem, err: Exception, image_id: str | None, key: bytes | None
) -> dict[str, Any]:
    """``{"error": ...}`` for one input that failed with ``err``: its reason code, and a detail
    without the exception's text when keyed (it can hold paths and names)."""
    if isinstance(err, DecodeError):
        detail = err.detail if key is None else safe_detail(err, err.reason.value)
        return _error(item, err.reason.value, detail, image_id)
    if isinstance(err, Rejected):
        return _error(item, err.reason, err.detail, image_id)
    if isinstance(err, BadMetadata):
        return _error(item, "bad_metadata", str(err), image_id)
    if isinstance(err, storage.TooLarge):  # the mask (the image's size was checked before)
        return _error(item, "too_large", f"mask: {err}", image_id)
    if isinstance(err, OSError | ValueError):
        # Storage or metadata problems with this one file; never the whole run.
        detail = f"{type(err).__name__}: {err}"[:300] if key is None else type(err).__name__
        return _error(item, "unreadable", detail, image_id)
    # anything else about this one file: its row, not the run's end
    return _error(item, "failed", type(err).__name__, image_id)


def ingest_chunk(
    items: Sequence[SourceItem], dest: str, cfg: IngestConfig, key: bytes | None
) -> list[dict]:
    return [_ingest_one(item, dest, cfg, key) for item in items]


def _run_local(items, dest, cfg, key, progress: Progress | None) -> list[dict]:
    out = []
    for i, item in enumerate(items):
        out.append(_ingest_one(item, dest, cfg, key))
        if progress:
            progress(i + 1, len(items))
    return out


def _run_ray(items, dest, cfg, key, progress: Progress | None) -> list[dict]:
    from .runtime.cluster import map_chunks

    def one_by_one(chunk: Sequence[SourceItem], err: Exception) -> list[dict]:
        # The task failed as a whole (its worker died, its input did not unpickle, ...): each
        # of its files again in a task of its own, so that only the file at fault is lost.
        log.warning("ingest: a task of %d files failed (%s)", len(chunk), type(err).__name__)

        def lost(single: Sequence[SourceItem], e: Exception) -> list[dict]:
            return [_error(single[0], "failed", type(e).__name__, None)]

        return map_chunks(ingest_chunk, [[it] for it in chunk], dest, cfg, key, on_error=lost)

    chunks = [items[i : i + cfg.chunk_size] for i in range(0, len(items), cfg.chunk_size)]
    return map_chunks(ingest_chunk, chunks, dest, cfg, key, progress=progress, on_error=one_by_one)


def stored_splits(manifest_uri: str) -> dict[str, str]:
    """patient_id → split of a manifest written earlier at ``manifest_uri`` ({} if none): a
    re-ingest keeps every known patient where it was."""
    if not storage.exists(manifest_uri):
        return {}
    table = read_manifest(manifest_uri).select(["patient_id", "split"])
    return {
        p: s
        for p, s in zip(
            table.column("patient_id").to_pylist(), table.column("split").to_pylist(), strict=True
        )
        if p and s
    }


def ingest(cfg: IngestConfig, progress: Progress | None = None) -> IngestResult:
    """Ingest ``cfg.src`` into ``cfg.dest``; see the module docstring. A DICOMweb source
    (``dicomweb+https://``) is pulled by :func:`covidray.pacs.pull.pull` instead."""
    refuse_stored_splits(cfg.dest, cfg.split.test_sources)
    layout: Layout = scan(cfg.src, cfg.layout, cfg.labels)
    key = secret_bytes(cfg.pseudonym_key)
    if key is None and any(item.from_dicom for item in layout.items):
        raise ValueError(
            f"DICOM patient IDs are stored only as keyed hashes: set {PSEUDONYM_KEY_ENV} "
            "(or pseudonym_key in the config) to this site's secret key"
        )
    items = layout.items
    log.info(
        "ingest: layout %s, %d files, %d excluded by metadata",
        layout.name,
        len(items),
        len(layout.skipped),
    )
    runner = _run_ray if len(items) > cfg.parallel_threshold else _run_local
    results = runner(items, cfg.dest, cfg, key, progress)
    hide = key is not None and not cfg.keep_source_paths  # source paths can name patients
    if hide:
        for result in results:
            record = result.get("row") or result["error"]
            record["source_uri"] = source_ref(record["source_uri"], key)

    errors = [
        {
            "source_uri": source_ref(s.source_uri, key) if hide else s.source_uri,
            "reason": s.reason,
            "detail": s.detail,
            "image_id": None,
        }
        for s in layout.skipped
    ]
    rows: list[dict[str, Any]] = []
    kept: dict[str, dict[str, Any]] = {}
    n_duplicates = 0
    for result in results:
        if "error" in result:
            errors.append(result["error"])
            continue
        row = result["row"]
        first = kept.get(row["image_id"])
        if first is not None:
            n_duplicates += 1
            conflict = "" if first.get("label") == row.get("label") else " (with a different label)"
            errors.append(
                {
                    "source_uri": row["source_uri"],
                    "reason": "duplicate",
                    "detail": f"same bytes as {first['source_uri']}{conflict}",
                    "image_id": row["image_id"],
                }
            )
            continue
        kept[row["image_id"]] = row
        rows.append(row)

    splits = split_by_patient(
        [r["patient_id"] for r in rows],
        [r.get("label") for r in rows],
        [[r.get(c) for c in cfg.split.stratify if c != "label"] for r in rows],
        cfg.split,
        known=stored_splits(storage.join(cfg.dest, MANIFEST_NAME)),
    )
    splits = hold_out(
        splits,
        [r["patient_id"] for r in rows],
        [r.get("source") for r in rows],
        cfg.split.test_sources,
    )
    for row, split in zip(rows, splits, strict=True):
        row["split"] = split
    rows.sort(key=lambda r: (r.get("label") or "~", r["patient_id"], r["image_id"]))

    manifest_uri = storage.join(cfg.dest, MANIFEST_NAME)
    errors_uri = storage.join(cfg.dest, ERRORS_NAME)
    # A source's own extra columns are kept verbatim, so with hidden paths only the layouts'.
    extras = [c for c in layout.extra_columns if not hide or c in LAYOUT_EXTRAS]
    storage.write_parquet(
        with_held_out(to_table(rows, extras), cfg.split.test_sources), manifest_uri
    )
    storage.write_parquet(errors_table(errors), errors_uri)

    counts: dict[str, dict[str, int]] = {}
    for (label, split), n in Counter(
        (r.get("label") or "unlabelled", r.get("split") or "none") for r in rows
    ).items():
        counts.setdefault(label, {})[split] = n
    return IngestResult(
        layout=layout.name,
        manifest_uri=manifest_uri,
        errors_uri=errors_uri,
        n_inputs=len(items) + len(layout.skipped),
        n_rows=len(rows),
        n_errors=len(errors) - n_duplicates,
        n_duplicates=n_duplicates,
        counts=counts,
        error_reasons=dict(Counter(e["reason"] for e in errors)),
    )
