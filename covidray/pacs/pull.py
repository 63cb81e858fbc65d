"""``covidray ingest dicomweb+https://HOST/PATH DEST --links URI``: new CR/DX films of a
DICOMweb archive into a dataset, incrementally.

1. QIDO-RS: the studies whose ``ModalitiesInStudy`` include one of ``--modality`` (one query
   per modality), in the ``--study-date`` window; then each study's instances. Only image
   instances of the CR and DX storage SOP classes are candidates: never an SR, a Secondary
   Capture or a CT (counted in ``not_retrieved``), so the next night does not pull this
   project's own results.
2. Each candidate's ``image_id`` is a keyed hash of its SOP Instance UID
   (:func:`instance_id`): the dataset knows which instances it holds without holding a UID.
   Those held already (a manifest row, or an error row that is no retry) are skipped unread.
3. WADO-RS, ``archive_requests`` at a time; an instance whose pixel data (rows × columns ×
   bits × samples, from QIDO) is beyond the decoder's limits is refused unread. Each
   retrieved instance goes through ingest's own path (:func:`covidray.ingest.ingest_bytes`:
   decode, DICOM header fields, keyed pseudonyms). A retrieval that fails for want of the
   archive (no connection, timeout, 5xx) is a retry row (reason ``unreachable``), tried again
   next time; a malformed instance is an error row with its reason.
4. The link table gains the new films' UIDs (before the manifest: a manifest row never lacks
   its link), then the manifest gains their rows (earlier rows and splits stay) and the errors
   file its rows (earlier retry rows are replaced by this run's outcome).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
from pydantic import BaseModel

from .. import storage
from ..config import PSEUDONYM_KEY_ENV, IngestConfig, secret_bytes
from ..ingest import IngestResult, Rejected, failure_record, ingest_bytes
from ..layouts import SourceItem
from ..manifest import ERRORS_NAME, MANIFEST_NAME, errors_table, read_manifest, to_table
from .client import Archive, ArchiveRefused, ArchiveUnavailable
from .links import Link, add_links

log = logging.getLogger(__name__)

# Image storage SOP classes retrieved: CR, DX for presentation, DX for processing.
IMAGE_SOP_CLASSES = frozenset(
    {"1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1"}
)
PAGE = 500  # QIDO-RS results per request
RETRY_REASON = "unreachable"  # an error row the next pull tries again
SOURCE = "dicomweb"
_TAGS = {  # DICOM JSON keys of the QIDO-RS attributes used
    "study": "0020000D",
    "series": "0020000E",
    "sop": "00080018",
    "sop_class": "00080016",
    "modality": "00080060",
    "rows": "00280010",
    "columns": "00280011",
    "bits": "00280100",
    "samples": "00280002",
    "frames": "00280008",
}
INSTANCE_FIELDS = [v for k, v in _TAGS.items() if k not in ("study", "series", "sop")]

Stop = Callable[[], None]  # raises when the run must stop (a lost lock)
Progress = Callable[[int, int], None]


class Candidate(BaseModel):
    """An image instance to retrieve."""

    image_id: str
    link: Link
    rows: int | None = None
    columns: int | None = None
    bits: int | None = None
    samples: int | None = None
    frames: int | None = None


def instance_id(sop_uid: str, key: bytes) -> str:
    """The image_id of an archive instance: HMAC-SHA256 of its SOP Instance UID under the
    site's key (64 hex digits, like a folder ingest's sha256)."""
    return hmac.new(key, b"sop-instance\0" + sop_uid.encode(), hashlib.sha256).hexdigest()


def _value(attrs: dict[str, Any], name: str) -> Any:
    values = attrs.get(_TAGS[name], {}).get("Value") or [None]
    return values[0]


def _int(attrs: dict[str, Any], name: str) -> int | None:
    value = _value(attrs, name)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def held_ids(dest: str) -> set[str]:
    """image_ids the dataset holds: its rows, and its error rows that are no retry."""
    held: set[str] = set()
    manifest = storage.join(dest, MANIFEST_NAME)
    if storage.exists(manifest):
        held.update(read_manifest(manifest).column("image_id").to_pylist())
    errors = storage.join(dest, ERRORS_NAME)
    if storage.exists(errors):
        for row in storage.read_parquet(errors, columns=["image_id", "reason"]).to_pylist():
            if row["image_id"] and row["reason"] != RETRY_REASON:
                held.add(row["image_id"])
    return held


def _all_pages(archive: Archive, search: Callable[..., list], **kwargs: Any) -> list[dict]:
    """Every result of a QIDO-RS query, ``PAGE`` at a time (``limit``/``offset``); stops at a
    short page, or at a page with nothing new (an archive that ignores ``offset``)."""
    out: list[dict] = []
    seen: set[str] = set()
    while True:
        page = archive.call(search, limit=PAGE, offset=len(out), **kwargs)
        new = [r for r in page if repr(r) not in seen]
        seen.update(repr(r) for r in new)
        out.extend(new)
        if len(page) < PAGE or not new:
            return out


def find_candidates(
    archive: Archive, cfg: IngestConfig, key: bytes, held: set[str]
) -> tuple[list[Candidate], int, Counter[str]]:
    """QIDO-RS: (instances to retrieve, how many are held already, other objects by modality)."""
    client = archive.client
    studies: dict[str, None] = {}
    for modality in cfg.modality:
        filters: dict[str, Any] = {"ModalitiesInStudy": modality}
        if cfg.study_date:
            filters["StudyDate"] = cfg.study_date
        for study in _all_pages(archive, client.search_for_studies, search_filters=filters):
            studies[str(_value(study, "study"))] = None
    found: list[Candidate] = []
    n_held, other = 0, Counter[str]()
    for study_uid in studies:
        instances = _all_pages(
            archive,
            client.search_for_instances,
            study_instance_uid=study_uid,
            fields=INSTANCE_FIELDS,
        )
        for attrs in instances:
            sop_class = str(_value(attrs, "sop_class") or "")
            if sop_class not in IMAGE_SOP_CLASSES:
                other[str(_value(attrs, "modality") or "unknown")] += 1
                continue
            sop_uid = str(_value(attrs, "sop"))
            image_id = instance_id(sop_uid, key)
            if image_id in held:
                n_held += 1
                continue
            link = Link(
                image_id=image_id,
                study_uid=study_uid,
                series_uid=str(_value(attrs, "series")),
                sop_uid=sop_uid,
                sop_class_uid=sop_class,
            )
            found.append(
                Candidate(
                    image_id=image_id,
                    link=link,
                    **{k: _int(attrs, k) for k in ("rows", "columns", "bits", "samples", "frames")},
                )
            )
    return found, n_held, other


def _size_problem(c: Candidate, cfg: IngestConfig) -> str | None:
    """Why the instance's pixel data is beyond the decoder's limits (None: within them)."""
    if c.rows is None or c.columns is None:
        return None  # unknown here: the decoder checks the header before any pixel
    pixels = c.rows * c.columns * (c.frames or 1)
    if pixels > cfg.decode.max_pixels:
        return f"{c.columns}x{c.rows} exceeds max_pixels={cfg.decode.max_pixels}"
    nbytes = pixels * (c.samples or 1) * ((c.bits or 16) + 7) // 8
    if nbytes > cfg.decode.max_bytes:
        return f"pixel data larger than {cfg.decode.max_bytes} bytes"
    return None


def _part10(ds: Any) -> bytes:
    """A retrieved dataset as a Part 10 file (preamble, file meta), as a modality writes."""
    import pydicom

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def fetch_one(
    archive: Archive, c: Candidate, dest: str, cfg: IngestConfig, key: bytes
) -> dict[str, Any]:
    """Retrieve, check and ingest one instance: ``{"row"|"error": ...}``."""
    item = SourceItem(uri=f"{SOURCE}:{c.image_id}", meta={"source": SOURCE}, from_dicom=True)
    try:
        problem = _size_problem(c, cfg)
        if problem:
            raise Rejected("too_large", problem)
        link = c.link
        ds = archive.call(
            archive.client.retrieve_instance, link.study_uid, link.series_uid, link.sop_uid
        )
        data = _part10(ds)
    except ArchiveUnavailable as err:
        return {
            "error": {
                "source_uri": item.uri,
                "reason": RETRY_REASON,
                "detail": f"archive: {err.what}",
                "image_id": c.image_id,
            }
        }
    except ArchiveRefused as err:
        reason = "not_found" if err.status in (404, 410) else "refused"
        return {
            "error": {
                "source_uri": item.uri,
                "reason": reason,
                "detail": f"archive: HTTP {err.status}",
                "image_id": c.image_id,
            }
        }
    except Rejected as err:
        return failure_record(item, err, c.image_id, key)
    except Exception as err:  # the answer was no readable DICOM instance
        return {
            "error": {
                "source_uri": item.uri,
                "reason": "malformed",
                "detail": f"WADO-RS answer not readable ({type(err).__name__})",
                "image_id": c.image_id,
            }
        }
    return ingest_bytes(item, data, c.image_id, dest, cfg, key)


def pull(
    cfg: IngestConfig, progress: Progress | None = None, stop: Stop | None = None
) -> IngestResult:
    """Pull ``cfg.src`` into ``cfg.dest`` (see the module docstring). ``stop()`` is called
    before anything is written and raises when the run must not write."""
    key = secret_bytes(cfg.pseudonym_key)
    if key is None:
        raise ValueError(
            f"a DICOMweb source holds patient identifiers: set {PSEUDONYM_KEY_ENV} (or "
            "pseudonym_key in the config) to this site's secret key"
        )
    archive = Archive(
        cfg.src,
        ca_bundle=cfg.ca_bundle,
        timeout_s=cfg.archive_timeout_s,
        pool=cfg.archive_requests,
    )
    archive.check()
    try:
        candidates, n_held, other = find_candidates(archive, cfg, key, held_ids(cfg.dest))
    except (ArchiveUnavailable, ArchiveRefused) as err:
        raise ArchiveQueryFailed(archive.where, err) from None
    log.info("pull: %d instances to retrieve, %d held already", len(candidates), n_held)
    results: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=cfg.archive_requests) as pool:
        futures = [pool.submit(fetch_one, archive, c, cfg.dest, cfg, key) for c in candidates]
        for i, future in enumerate(futures):
            results.append(future.result())
            if progress is not None:
                progress(i + 1, len(futures))
    if stop is not None:
        stop()
    return _write(cfg, candidates, results, n_held, other)


class ArchiveQueryFailed(Exception):
    """A QIDO-RS query failed midway: nothing was written (the next run starts over)."""

    def __init__(self, where: str, err: Exception) -> None:
        super().__init__(f"the archive at {where} failed a QIDO-RS query ({err}); nothing pulled")


def _write(
    cfg: IngestConfig,
    candidates: list[Candidate],
    results: list[dict[str, Any]],
    n_held: int,
    other: Counter[str],
) -> IngestResult:
    rows = [r["row"] for r in results if "row" in r]
    errors = [r["error"] for r in results if "error" in r]
    links = {c.image_id: c.link for c in candidates}
    add_links(cfg.links or "", [links[r["image_id"]] for r in rows])

    manifest_uri = storage.join(cfg.dest, MANIFEST_NAME)
    errors_uri = storage.join(cfg.dest, ERRORS_NAME)
    new = to_table(rows)
    if storage.exists(manifest_uri):
        old = read_manifest(manifest_uri)
        new = pa.concat_tables([old, new], promote_options="permissive")
    if rows or not storage.exists(manifest_uri):
        storage.write_parquet(new, manifest_uri)
    kept = []
    if storage.exists(errors_uri):
        kept = [
            e for e in storage.read_parquet(errors_uri).to_pylist() if e["reason"] != RETRY_REASON
        ]
    storage.write_parquet(errors_table([*kept, *errors]), errors_uri)
    reasons = Counter(e["reason"] for e in errors)
    return IngestResult(
        layout=SOURCE,
        manifest_uri=manifest_uri,
        errors_uri=errors_uri,
        n_inputs=len(candidates) + n_held,
        n_rows=len(rows),
        n_errors=len(errors),
        n_duplicates=0,
        counts={"unlabelled": {"none": len(rows)}} if rows else {},
        error_reasons=dict(reasons),
        n_skipped=n_held,
        n_retry=reasons.get(RETRY_REASON, 0),
        not_retrieved=dict(other),
    )
