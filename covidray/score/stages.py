"""The stages of the scoring job, as plain functions on batches (Ray Data calls them).

1. :func:`read_decode` (``read_chunk`` files a batch): fetch the bytes concurrently,
   ``image_id`` = sha256 of the raw bytes (a manifest's own ``image_id`` for datasets, which
   ingest computed the same way from the original file), decode, squash-resize to the model's
   input size and keep it as uint8 (``S×S``: small blocks to move). A file that cannot be read
   or decoded becomes a row with ``error``/``error_detail``; nothing raises.
2. :class:`ScoreWorker` (one per scoring actor) holds a :class:`covidray.predict.Predictor` and
   adds probabilities, label and Grad-CAM (summary numbers and the raw map as a PNG).
3. :func:`write_batch` (``rows_per_file`` rows a batch): optional overlay PNGs, then one
   Parquet file per batch through :func:`covidray.score.results.write_part` (atomic,
   deterministic name). The overlays are written first, so a Parquet file is the batch's
   commit record.

Each stage adds the seconds it spent on a batch, shared out over the batch's rows
(:data:`STAGE_COLUMNS`: fetch, decode, model, encode); :func:`write_batch` adds its own and
sums them into its summary row, so a run can say where its time went
(``ScoreResult.stage_s``).

Between stages a row's ``status`` is :data:`PENDING` (to be scored), :data:`SKIP` (done
already: counted, not written) or its final status (:mod:`.results`): the metadata layer of
the input gate decides in stage 1, before any pixel reaches the model; the image layer in
stage 2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..codec import decode_png_u8, encode_png
from ..decode import DecodeError, decode_array, is_dicom
from ..gate import metadata_reason
from ..pseudonyms import pseudonymize, safe_detail, shift_date, source_ref
from . import results

log = logging.getLogger(__name__)

PENDING, SKIP = "pending", "skip"
# Seconds per stage, per row (a batch's time over its rows): summed by write_batch.
STAGE_COLUMNS = ("t_fetch_s", "t_decode_s", "t_model_s", "t_encode_s")
# Errors worth another try on the next run: the bytes never arrived.
RETRY_REASONS = frozenset({"unreadable"})


def read_decode(
    batch: dict[str, np.ndarray],
    *,
    size: int,
    shorter_side: int,
    contrast: str = "none",
    done: frozenset[str],
    max_bytes: int,
    max_pixels: int,
    pseudonym_key: bytes | None,
    keep_source_paths: bool = False,
) -> pa.Table:
    """Read, hash and decode a batch of items into ``size×size`` uint8 pixels (the one
    preprocessing path: ``shorter_side`` normalisation, then the square resize) or error rows.

    With a ``pseudonym_key`` nothing identifying leaves: DICOM dates are shifted per patient,
    error details keep the exception's type and reason, and ``uri`` names the image by its
    id (``image:<image_id>``, or the keyed ``ref:`` of a path never read) unless
    ``keep_source_paths``."""
    from ..preprocess import prepare_array

    t_read = time.time()
    uris = [str(u) for u in batch["uri"]]
    n = len(uris)
    sizes = [None if np.isnan(s) else int(s) for s in _floats(batch["size"])]
    ids: list[str | None] = [None if i is None else str(i) for i in batch["image_id"]]
    patients = [None if p is None else str(p) for p in batch["patient_id"]]
    dates = [None if d is None else str(d) for d in batch["study_date"]]
    views = (
        [None if v is None else str(v) for v in batch["view"]] if "view" in batch else [None] * n
    )
    status, errors, details = [PENDING] * n, [None] * n, [None] * n
    gate_reasons: list[str | None] = [None] * n
    pixels = np.zeros((n, size, size), dtype=np.uint8)

    def fail(i: int, reason: str, detail: str, err: BaseException | None = None) -> None:
        status[i] = results.RETRY if reason in RETRY_REASONS else results.FAILED
        if err is not None and pseudonym_key is not None:
            detail = safe_detail(err, reason)  # an exception's text can hold paths and names
        errors[i], details[i] = reason, detail[:500]

    # Refused before reading: a manifest row whose path leaves the dataset (inputs.BAD_PATH).
    refused = list(batch["error"]) if "error" in batch else [None] * n
    why = list(batch["error_detail"]) if "error_detail" in batch else [None] * n
    wanted = [i for i in range(n) if not refused[i] and (sizes[i] is None or sizes[i] <= max_bytes)]
    # Sizes not known from a listing are checked (HEAD) before the GET: memory stays bounded.
    got = storage.read_many(
        [uris[i] for i in wanted], max_bytes=max_bytes, sizes=[sizes[i] for i in wanted]
    )
    t_fetched = time.time()
    blobs = dict(zip([uris[i] for i in wanted], got, strict=True))
    for i, uri in enumerate(uris):
        if refused[i]:
            fail(i, str(refused[i]), str(why[i] or ""))
            continue
        if sizes[i] is not None and sizes[i] > max_bytes:
            fail(i, "too_large", f"file larger than {max_bytes} bytes")
            continue
        data = blobs[uri]
        if isinstance(data, storage.TooLarge):
            fail(i, "too_large", f"file larger than {max_bytes} bytes")
            continue
        if isinstance(data, Exception):
            fail(i, "unreadable", f"{type(data).__name__}: {data}", data)
            continue
        if len(data) > max_bytes:
            fail(i, "too_large", f"file larger than {max_bytes} bytes")
        if ids[i] is None:
            ids[i] = hashlib.sha256(data).hexdigest()
        if ids[i] in done:
            status[i] = SKIP
            continue
        if status[i] != PENDING:
            continue
        tags = _dicom_tags(data) or _row_tags(batch, i)
        if tags.get("view"):
            views[i] = str(tags["view"])  # kept beside the image's own verdict
        reason = metadata_reason(tags)
        if reason is not None:  # out of scope before any pixel reaches the model
            status[i], gate_reasons[i] = results.OUT_OF_SCOPE, reason
        else:
            try:
                image = decode_array(data, max_pixels=max_pixels)
                pixels[i] = prepare_array(image, size, shorter_side, contrast)
            except DecodeError as err:
                fail(i, err.reason.value, err.detail, err)
                continue
            except Exception as err:  # a bug or an odd file nobody foresaw: one row, not the job
                fail(i, "decode_failed", f"{type(err).__name__}: {err}", err)
                continue
        # Study metadata from the header; the PatientID only as ingest's keyed pseudonym.
        if patients[i] is None and tags.get("patient_id") and pseudonym_key is not None:
            patients[i] = f"dicom:{pseudonymize(tags['patient_id'], pseudonym_key)}"
        if dates[i] is None and tags.get("study_date"):  # a manifest's are shifted already
            raw = tags["study_date"]
            dates[i] = raw if pseudonym_key is None else shift_date(raw, patients[i], pseudonym_key)
    if pseudonym_key is not None and not keep_source_paths:  # source names can name patients
        uris = [
            f"image:{ids[i]}" if ids[i] else source_ref(u, pseudonym_key)
            for i, u in enumerate(uris)
        ]
    from ray.data.extensions import ArrowTensorArray

    study_day = _floats(batch["study_day"])
    t_done = time.time()
    return pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "uri": pa.array(uris, pa.string()),
            "patient_id": pa.array(patients, pa.string()),
            "study_day": pa.array(study_day, pa.float32(), mask=np.isnan(study_day)),
            "study_date": pa.array(dates, pa.string()),
            "status": pa.array(status, pa.string()),
            "gate_reason": pa.array(gate_reasons, pa.string()),
            "view": pa.array(views, pa.string()),
            "error": pa.array(errors, pa.string()),
            "error_detail": pa.array(details, pa.string()),
            "t_read": pa.array([t_read] * n, pa.float64()),
            "t_fetch_s": pa.array([(t_fetched - t_read) / n] * n, pa.float64()),
            "t_decode_s": pa.array([(t_done - t_fetched) / n] * n, pa.float64()),
            "pixels": ArrowTensorArray.from_numpy(pixels),
        }
    )


def _dicom_tags(data: bytes) -> dict[str, Any]:
    """The DICOM header's fields ({} for other files or an unreadable header)."""
    from ..dicom_meta import dicom_tags

    if not is_dicom(data):
        return {}
    try:
        return dicom_tags(data)
    except DecodeError:
        return {}


def _row_tags(batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    """The gate's DICOM fields a dataset row kept from its DICOM header ({} for a prefix input,
    rows from other formats, whose ``view`` is a layout's, and rows from before)."""
    from .inputs import GATE_COLUMNS

    if "modality" not in batch or batch["modality"][i] is None:
        return {}
    return {k: batch[k][i] for k in GATE_COLUMNS if k in batch and batch[k][i] is not None}


class ScoreWorker:
    """A Ray Data actor holding one Predictor."""

    def __init__(
        self,
        model_uri: str,
        device: str,
        threads: int,
        amp: bool | None,
        compile: bool,
        keep_pixels: bool,
    ) -> None:
        import torch

        from ..predict import Predictor

        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS to the actor's CPUs
        t0 = time.perf_counter()
        self.predictor = Predictor.from_dir(
            model_uri, device=device, compile=compile, amp=amp, threads=threads
        )
        self.keep_pixels = keep_pixels
        log.info(
            "scoring actor: model %s on %s, %d threads, loaded in %.1f s",
            self.predictor.model_version,
            device,
            threads,
            time.perf_counter() - t0,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from ..labels import CLASSES

        p = self.predictor
        t0 = time.perf_counter()
        status = np.array(batch["status"], dtype=object)
        gate_reasons = list(batch["gate_reason"])
        n = len(status)
        ok = np.flatnonzero(status == PENDING)
        probs = np.full((n, len(CLASSES)), np.nan, dtype=np.float32)
        cams = {k: np.full(n, np.nan, dtype=np.float32) for k in _CAM_FIELDS}
        ood = np.full(n, np.nan, dtype=np.float32)
        in_scope: list[bool | None] = [False if s == results.OUT_OF_SCOPE else None for s in status]
        labels: list[str | None] = [None] * n
        pngs: list[bytes | None] = [None] * n
        covid_area = np.full(n, np.nan, dtype=np.float32)
        covid_pngs: list[bytes | None] = [None] * n
        if len(ok):
            res = p.predict(batch["pixels"][ok][:, None], with_cam=True)
            self._fixed_covid_maps(batch, ok, covid_area, covid_pngs)
            t_model = time.perf_counter()
            for c, name in enumerate(CLASSES):
                probs[ok, c] = res.probs[:, p.classes.index(name)]
            for k in _CAM_FIELDS:
                cams[k][ok] = getattr(res, k)
            if res.ood_score is not None:
                ood[ok] = res.ood_score
            for j, i in enumerate(ok):
                labels[i] = res.labels[j]
                pngs[i] = encode_png(res.cam_raw[j])
                in_scope[i] = bool(res.in_scope[j])
                gate_reasons[i] = res.gate_reason[j]
                status[i] = results.SCORED if res.in_scope[j] else results.OUT_OF_SCOPE
        else:
            t_model = t0
        now = datetime.now(UTC)
        cols: dict[str, Any] = {
            name: _arrow(batch[name], typ)
            for name, typ in (
                ("image_id", pa.string()),
                ("uri", pa.string()),
                ("patient_id", pa.string()),
                ("study_day", pa.float32()),
                ("study_date", pa.string()),
                ("view", pa.string()),
                ("error", pa.string()),
                ("error_detail", pa.string()),
                ("t_read", pa.float64()),
                ("t_fetch_s", pa.float64()),
                ("t_decode_s", pa.float64()),
            )
        }
        for c, name in enumerate(CLASSES):
            cols[f"prob_{name}"] = _arrow(probs[:, c], pa.float32())
        cols["label"] = pa.array(labels, pa.string())
        cols["status"] = pa.array(status.tolist(), pa.string())
        cols["in_scope"] = pa.array(in_scope, pa.bool_())
        cols["gate_reason"] = pa.array(gate_reasons, pa.string())
        cols["ood_score"] = _arrow(ood, pa.float32())
        cols["model_version"] = pa.array([p.model_version] * n, pa.string())
        cols["scoring_version"] = pa.array([p.scoring_version] * n, pa.string())
        for k in _CAM_FIELDS:
            cols[k] = _arrow(cams[k], pa.float32())
        cols["cam_png"] = pa.array(pngs, pa.binary())
        cols["cam_covid_area"] = _arrow(covid_area, pa.float32())
        cols["cam_covid_png"] = pa.array(covid_pngs, pa.binary())
        cols["scored_at"] = pa.array([now] * n, pa.timestamp("us", tz="UTC"))
        if self.keep_pixels:
            from ray.data.extensions import ArrowTensorArray

            cols["pixels"] = ArrowTensorArray.from_numpy(np.ascontiguousarray(batch["pixels"]))
        t_end = time.perf_counter()
        cols["t_model_s"] = pa.array([(t_model - t0) / n] * n, pa.float64())
        cols["t_encode_s"] = pa.array([(t_end - t_model) / n] * n, pa.float64())
        return pa.table(cols)

    def _fixed_covid_maps(
        self, batch: dict[str, np.ndarray], ok: np.ndarray, area: np.ndarray, pngs: list
    ) -> None:
        """Fill ``area``/``pngs`` with the COVID-class map on the model's fixed scale
        (:mod:`covidray.explain.fixed`) for the rows that can join a patient's timeline (those
        with a patient_id). A second Grad-CAM pass; nothing without the card's scale."""
        p = self.predictor
        scale = getattr(p.card, "cam_covid_scale", None)
        rows = [i for i in ok if isinstance(batch["patient_id"][i], str)]
        if scale is None or "covid" not in p.classes or not rows:
            return
        import torch

        from ..explain import fixed_class_maps

        x = p.prepare(batch["pixels"][rows][:, None])
        with torch.autocast(p.device.type, dtype=p.amp_dtype, enabled=p.amp):
            maps, covid_area = fixed_class_maps(
                p.model, x, p.classes.index("covid"), scale, threshold=p.cam_threshold
            )
        for j, i in enumerate(rows):
            area[i] = covid_area[j]
            pngs[i] = encode_png(maps[j])


_CAM_FIELDS = ("cam_area", "cam_peak_y", "cam_peak_x", "cam_border_energy")


def _floats(values: np.ndarray) -> np.ndarray:
    """A numeric batch column (float with NaN, or object with None) → float64 with NaN."""
    if values.dtype.kind in "fiub":
        return values.astype(np.float64)
    return np.array([np.nan if v is None else float(v) for v in values.tolist()], np.float64)


def _arrow(values: np.ndarray, typ: pa.DataType) -> pa.Array:
    if pa.types.is_floating(typ):
        arr = _floats(values)
        return pa.array(arr, typ, mask=np.isnan(arr))
    return pa.array([None if v is None else v for v in values.tolist()], typ)


def write_batch(
    batch: pa.Table,
    *,
    out: str,
    run_date: str,
    scoring_version: str,
    overlays: bool,
    write_retry_s: float = 0.0,
) -> pa.Table:
    """Write one Parquet file (and overlays) for a batch; return one summary row. Writes go
    through transient storage errors for ``write_retry_s`` seconds; past that the batch's
    task fails, so does the run, and the rerun scores exactly the images left without a row."""
    status = batch.column("status").to_pylist()
    keep = [i for i, s in enumerate(status) if s != SKIP]
    rows = batch.take(pa.array(keep, pa.int64()))
    counts = Counter(status)
    reasons = Counter(r for r in rows.column("error").to_pylist() if r)
    gated = Counter(r for r in rows.column("gate_reason").to_pylist() if r)
    labels = Counter(
        lab
        for lab, st in zip(
            rows.column("label").to_pylist(), rows.column("status").to_pylist(), strict=True
        )
        if lab and st == results.SCORED
    )
    uri = ""
    t0 = time.perf_counter()
    if rows.num_rows:
        if overlays and "pixels" in rows.schema.names:
            _write_overlays(rows, out, write_retry_s)
        uri = results.write_part(
            rows.select(list(results.COLUMNS)), out, run_date, scoring_version, write_retry_s
        )
    t_read = batch.column("t_read").to_numpy()
    stage_s = {
        k: [float(pc.sum(batch.column(k)).as_py() or 0.0)]
        for k in STAGE_COLUMNS
        if k in batch.schema.names
    }
    return pa.table(
        {
            **stage_s,
            "t_write_s": [time.perf_counter() - t0],
            "file": [uri],
            "n_scored": [counts[results.SCORED]],
            "n_out_of_scope": [counts[results.OUT_OF_SCOPE]],
            "n_errors": [counts[results.FAILED] + counts[results.RETRY]],
            "n_retry": [counts[results.RETRY]],
            "n_skipped": [counts[SKIP]],
            "reasons": [json.dumps(dict(reasons))],
            "gate_reasons": [json.dumps(dict(gated))],
            "labels": [json.dumps(dict(labels))],
            "t_first_read": [float(t_read.min()) if len(t_read) else time.time()],
            "t_written": [time.time()],
        }
    )


def _write_overlays(rows: pa.Table, out: str, retry_s: float) -> None:
    import torch

    from ..explain import overlay

    pixels = rows.column("pixels").combine_chunks().to_numpy()
    for i, (image_id, png) in enumerate(
        zip(rows.column("image_id").to_pylist(), rows.column("cam_png").to_pylist(), strict=True)
    ):
        if png is None or image_id is None:
            continue
        cam = torch.from_numpy(decode_png_u8(png).astype(np.float32) / 255.0)
        rgb = overlay(pixels[i], cam, alpha=0.4)
        storage.write_bytes(results.overlay_uri(out, image_id), encode_png(rgb), retry_s=retry_s)
