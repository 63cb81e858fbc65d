"""``covidray publish --scores OUT --data DEST --links URI --to dicomweb+https://...``: the
results of scored films back into their studies, as DICOM.

For each film of the link table with a done prediction row (scored, or out of scope) whose
``(image_id, scoring_version)`` is not in the ledger (:mod:`.ledger`):

1. its metadata (WADO-RS, no pixels): the patient and study modules the results copy;
2. an SR (:func:`.sr.build_sr`) and, in scope, a Secondary Capture of the dataset's film with
   its Grad-CAM overlay (:mod:`.capture`); out-of-scope films get the SR only;
3. Series and SOP Instance UIDs derived from the source's UIDs, the ``scoring_version`` and
   the object's kind (:func:`derived_uid`): a rerun after a crash re-sends the same objects,
   and the archive keeps one copy;
4. STOW-RS, ``store_batch`` films' objects at a time; a failed request is retried
   (``store_retries``, waits doubling from ``store_retry_wait_s``), then reported; the
   ledger gains the batch's films once the archive accepted every object of them.

A film whose source the archive no longer has, or whose objects cannot be built, is reported
(counted by reason) and tried again next time. When the archive stops answering, the run
stops with what it published in the ledger and fails in one line; the next run goes on.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from .. import storage
from ..config import PSEUDONYM_KEY_ENV, secret_bytes
from ..datapaths import OutsideDataset, resolve_inside
from ..manifest import manifest_base, read_manifest
from ..score import results
from ..score.lock import OutputLock
from . import ledger
from .capture import build_sc, overlay_image
from .client import Archive, ArchiveRefused, ArchiveUnavailable
from .config import PublishConfig
from .links import Link, read_links
from .sr import build_sr

log = logging.getLogger(__name__)

UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root for generated UIDs
OBSERVER = "covidray-device"
PENDING_STATUSES = (results.SCORED, results.OUT_OF_SCOPE)
Stop = Callable[[], None]


class PublishResult(BaseModel):
    """What a publish run did."""

    n_pending: int  # films with results not yet in the ledger
    n_published: int  # films the archive accepted this run
    n_sr: int
    n_sc: int
    n_failed: int  # films not published (reasons below); tried again next run
    failed_reasons: dict[str, int]
    n_in_ledger: int  # published before
    wall_s: float
    films_per_s: float


class ArchiveStopped(Exception):
    """The archive stopped answering mid-run; what it accepted is in the ledger."""


def derived_uid(*sources: str) -> str:
    """A UID derived from ``sources`` only (pydicom's ``generate_uid`` with entropy sources):
    the same objects get the same UIDs on every run, within DICOM's 64 characters."""
    from pydicom.uid import generate_uid

    return str(generate_uid(UID_PREFIX, entropy_srcs=list(sources)))


def source_metadata(archive: Archive, link: Link) -> Any:
    """The source instance's attributes (WADO-RS metadata, no pixel data) as a Dataset."""
    from pydicom import Dataset

    attrs = archive.call(
        archive.client.retrieve_instance_metadata, link.study_uid, link.series_uid, link.sop_uid
    )
    attrs = {k: v for k, v in attrs.items() if "BulkDataURI" not in v and k[:4] != "7FE0"}
    return Dataset.from_json(attrs)


def build_objects(
    archive: Archive, link: Link, row: dict[str, Any], film_png: bytes | None, key: bytes
) -> tuple[list[Any], ledger.Entry]:
    """The SR (and SC) of one film, and the ledger entry it earns once stored."""
    source = source_metadata(archive, link)
    version = str(row["scoring_version"])
    number = int(source.get("InstanceNumber") or 1)
    sr = build_sr(
        source,
        row,
        series_uid=derived_uid(link.study_uid, version, "sr-series"),
        sop_uid=derived_uid(link.sop_uid, version, "sr"),
        tracking_uid=derived_uid(link.sop_uid, version, "tracking"),
        observer_uid=derived_uid(OBSERVER),
        instance_number=number,
    )
    objects = [sr]
    sc_key = None
    if row.get("in_scope") and row.get("cam_png") and film_png is not None:
        sc = build_sc(
            source,
            overlay_image(film_png, row["cam_png"]),
            series_uid=derived_uid(link.study_uid, version, "sc-series"),
            sop_uid=derived_uid(link.sop_uid, version, "sc"),
            instance_number=number,
        )
        sc.BurnedInAnnotation = "YES"  # the caption
        objects.append(sc)
        sc_key = ledger.uid_key(str(sc.SOPInstanceUID), key)
    entry = ledger.Entry(
        image_id=link.image_id,
        scoring_version=version,
        source_key=ledger.uid_key(link.sop_uid, key),
        sr_key=ledger.uid_key(str(sr.SOPInstanceUID), key),
        sc_key=sc_key,
    )
    return objects, entry


def with_retries(cfg: PublishConfig, fn: Callable[[], Any]) -> Any:
    """``fn()``, tried again on :class:`ArchiveUnavailable` up to ``store_retries`` times."""
    wait = cfg.store_retry_wait_s
    for attempt in range(cfg.store_retries + 1):
        try:
            return fn()
        except ArchiveUnavailable:
            if attempt == cfg.store_retries:
                raise
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def store(archive: Archive, cfg: PublishConfig, objects: list[Any]) -> set[str]:
    """STOW-RS ``objects`` (retried); the SOP Instance UIDs the archive says it stored."""
    answer = with_retries(cfg, lambda: archive.call(archive.client.store_instances, objects))
    return {str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence", [])}


def pending_rows(cfg: PublishConfig, links: dict[str, Link]) -> tuple[list[dict], int]:
    """Done prediction rows of linked films not in the ledger; how many are in it."""
    columns = [
        "image_id", "status", "label", "in_scope", "gate_reason", "model_version",
        "scoring_version", "cam_png", *(f"prob_{c}" for c in _classes()),
    ]  # fmt: skip
    table = results.read_predictions(cfg.scores, columns=columns, dedupe=True)
    done = ledger.published(cfg.scores)
    rows, n_done = [], 0
    for row in table.to_pylist():
        if row["image_id"] not in links or row["status"] not in PENDING_STATUSES:
            continue
        if (row["image_id"], row["scoring_version"]) in done:
            n_done += 1
            continue
        rows.append(row)
    return rows, n_done


def _classes() -> tuple[str, ...]:
    from ..labels import CLASSES

    return tuple(CLASSES)


def film_uris(data: str) -> dict[str, str]:
    """image_id → the dataset's normalised film (absolute URI)."""
    table = read_manifest(data).select(["image_id", "uri"]).to_pylist()
    base = manifest_base(data)
    out = {}
    for r in table:
        try:
            out[r["image_id"]] = resolve_inside(base, r["uri"])
        except OutsideDataset:  # a row pointing outside the dataset: no overlay for it
            continue
    return out


def _kind(err: BaseException) -> str:
    return type(err).__name__


def publish(cfg: PublishConfig) -> PublishResult:
    """:func:`publish_unlocked` holding the output's lock (that of the nightly job)."""
    with OutputLock(
        cfg.scores, stale_after_s=cfg.lock_stale_after_s, wait_s=cfg.lock_wait_s
    ) as lock:
        return publish_unlocked(cfg, stop=lock.check)


def publish_unlocked(cfg: PublishConfig, stop: Stop | None = None) -> PublishResult:
    """Publish what is pending (see the module docstring); ``stop()`` before each batch."""
    t0 = time.time()
    key = secret_bytes(cfg.pseudonym_key)
    if key is None:
        raise ValueError(f"publishing keys the ledger's UIDs: set {PSEUDONYM_KEY_ENV}")
    archive = Archive(
        cfg.to, ca_bundle=cfg.ca_bundle, timeout_s=cfg.archive_timeout_s, pool=cfg.archive_requests
    )
    archive.check()
    links = read_links(cfg.links)
    rows, n_done = pending_rows(cfg, links)
    films = film_uris(cfg.data) if rows else {}
    failed: Counter[str] = Counter()
    n_published = n_sr = n_sc = 0
    for start in range(0, len(rows), cfg.store_batch):
        if stop is not None:
            stop()
        batch = rows[start : start + cfg.store_batch]
        objects: list[Any] = []
        entries: list[tuple[ledger.Entry, list[str]]] = []
        try:
            for row in batch:
                link = links[row["image_id"]]
                film = films.get(row["image_id"])
                try:
                    png = storage.read_bytes(film) if film else None
                except OSError:  # the SR goes anyway; the overlay needs the film
                    png = None
                try:
                    made, entry = with_retries(
                        cfg,
                        lambda link=link, row=row, png=png: build_objects(
                            archive, link, row, png, key
                        ),
                    )
                except ArchiveRefused as err:
                    failed["source_not_found" if err.status in (404, 410) else "refused"] += 1
                    continue
                except ArchiveUnavailable:
                    raise
                except Exception as err:  # this film's objects; its message may quote its tags
                    log.warning("publish: a film's results could not be built (%s)", _kind(err))
                    failed[f"build_failed:{_kind(err)}"] += 1
                    continue
                objects.extend(made)
                entries.append((entry, [str(o.SOPInstanceUID) for o in made]))
            accepted = store(archive, cfg, objects) if objects else set()
        except ArchiveUnavailable as err:
            raise ArchiveStopped(
                f"the archive at {archive.where} stopped answering ({err.what}) after "
                f"{n_published} film(s) were published; the rest go at the next run"
            ) from None
        except ArchiveRefused as err:
            failed[f"stow_http_{err.status}"] += len(entries)
            continue
        stored = [entry for entry, uids in entries if set(uids) <= accepted]
        failed["not_accepted"] += len(entries) - len(stored)
        ledger.record(cfg.scores, stored)
        n_published += len(stored)
        n_sr += len(stored)
        n_sc += sum(e.sc_key is not None for e in stored)
    wall = time.time() - t0
    return PublishResult(
        n_pending=len(rows),
        n_published=n_published,
        n_sr=n_sr,
        n_sc=n_sc,
        n_failed=sum(failed.values()),
        failed_reasons={k: v for k, v in failed.items() if v},
        n_in_ledger=n_done,
        wall_s=round(wall, 3),
        films_per_s=round(n_published / wall, 2) if wall > 0 else 0.0,
    )
