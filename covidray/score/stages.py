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

Between stages a row's ``status`` says whether it was scored, is an error row, or was already
done (counted, not written).
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

from .. import storage
from ..codec import decode_png_u8, encode_png
from ..decode import DecodeError, decode_array, is_dicom
from ..pseudonyms import pseudonymize
from . import results

log = logging.getLogger(__name__)

OK, ERROR, SKIP = "ok", "error", "skip"


def read_decode(
    batch: dict[str, np.ndarray],
    *,
    size: int,
    done: frozenset[str],
    max_bytes: int,
    max_pixels: int,
    pseudonym_key: bytes | None,
) -> pa.Table:
    """Read, hash and decode a batch of items into ``size×size`` uint8 pixels or error rows."""
    import torch

    from ..codec import unit_to_u8_tensor
    from ..dicom_meta import dicom_tags
    from ..preprocess import to_model_input

    t_read = time.time()
    uris = [str(u) for u in batch["uri"]]
    n = len(uris)
    sizes = [None if np.isnan(s) else int(s) for s in _floats(batch["size"])]
    ids: list[str | None] = [None if i is None else str(i) for i in batch["image_id"]]
    patients = [None if p is None else str(p) for p in batch["patient_id"]]
    dates = [None if d is None else str(d) for d in batch["study_date"]]
    status, errors, details = [OK] * n, [None] * n, [None] * n
    pixels = np.zeros((n, size, size), dtype=np.uint8)

    def fail(i: int, reason: str, detail: str) -> None:
        status[i], errors[i], details[i] = ERROR, reason, detail[:500]

    wanted = [u for u, s in zip(uris, sizes, strict=True) if s is None or s <= max_bytes]
    blobs = dict(zip(wanted, storage.read_many(wanted), strict=True))
    for i, uri in enumerate(uris):
        if sizes[i] is not None and sizes[i] > max_bytes:
            fail(i, "too_large", f"file larger than {max_bytes} bytes")
            continue
        data = blobs[uri]
        if isinstance(data, Exception):
            fail(i, "unreadable", f"{type(data).__name__}: {data}")
            continue
        if len(data) > max_bytes:
            fail(i, "too_large", f"file larger than {max_bytes} bytes")
        if ids[i] is None:
            ids[i] = hashlib.sha256(data).hexdigest()
        if ids[i] in done:
            status[i] = SKIP
            continue
        if status[i] == ERROR:
            continue
        try:
            image = decode_array(data, max_pixels=max_pixels)
            x = to_model_input(torch.from_numpy(image)[None], size)
            pixels[i] = unit_to_u8_tensor(x)[0].numpy()
        except DecodeError as err:
            fail(i, err.reason.value, err.detail)
            continue
        except Exception as err:  # a bug or an odd file nobody foresaw: one row, not the job
            fail(i, "decode_failed", f"{type(err).__name__}: {err}")
            continue
        if is_dicom(data) and (patients[i] is None or dates[i] is None):
            # Study metadata from the header; the PatientID only as ingest's keyed pseudonym.
            try:
                tags = dicom_tags(data)
            except DecodeError:
                tags = {}
            if patients[i] is None and tags.get("patient_id") and pseudonym_key is not None:
                patients[i] = f"dicom:{pseudonymize(tags['patient_id'], pseudonym_key)}"
            dates[i] = dates[i] or tags.get("study_date")
    from ray.data.extensions import ArrowTensorArray

    study_day = _floats(batch["study_day"])
    return pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "uri": pa.array(uris, pa.string()),
            "patient_id": pa.array(patients, pa.string()),
            "study_day": pa.array(study_day, pa.float32(), mask=np.isnan(study_day)),
            "study_date": pa.array(dates, pa.string()),
            "status": pa.array(status, pa.string()),
            "error": pa.array(errors, pa.string()),
            "error_detail": pa.array(details, pa.string()),
            "t_read": pa.array([t_read] * n, pa.float64()),
            "pixels": ArrowTensorArray.from_numpy(pixels),
        }
    )


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
        status = batch["status"]
        n = len(status)
        ok = np.flatnonzero(status == OK)
        probs = np.full((n, len(CLASSES)), np.nan, dtype=np.float32)
        cams = {k: np.full(n, np.nan, dtype=np.float32) for k in _CAM_FIELDS}
        labels: list[str | None] = [None] * n
        pngs: list[bytes | None] = [None] * n
        if len(ok):
            res = p.predict(batch["pixels"][ok][:, None], with_cam=True)
            for c, name in enumerate(CLASSES):
                probs[ok, c] = res.probs[:, p.classes.index(name)]
            for k in _CAM_FIELDS:
                cams[k][ok] = getattr(res, k)
            for j, i in enumerate(ok):
                labels[i] = res.labels[j]
                pngs[i] = encode_png(res.cam_raw[j])
        now = datetime.now(UTC)
        cols: dict[str, Any] = {
            name: _arrow(batch[name], typ)
            for name, typ in (
                ("image_id", pa.string()),
                ("uri", pa.string()),
                ("patient_id", pa.string()),
                ("study_day", pa.float32()),
                ("study_date", pa.string()),
                ("status", pa.string()),
                ("error", pa.string()),
                ("error_detail", pa.string()),
                ("t_read", pa.float64()),
            )
        }
        for c, name in enumerate(CLASSES):
            cols[f"prob_{name}"] = _arrow(probs[:, c], pa.float32())
        cols["label"] = pa.array(labels, pa.string())
        cols["model_version"] = pa.array([p.model_version] * n, pa.string())
        for k in _CAM_FIELDS:
            cols[k] = _arrow(cams[k], pa.float32())
        cols["cam_png"] = pa.array(pngs, pa.binary())
        cols["scored_at"] = pa.array([now] * n, pa.timestamp("us", tz="UTC"))
        if self.keep_pixels:
            from ray.data.extensions import ArrowTensorArray

            cols["pixels"] = ArrowTensorArray.from_numpy(np.ascontiguousarray(batch["pixels"]))
        return pa.table(cols)


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
    batch: pa.Table, *, out: str, run_date: str, model_version: str, overlays: bool
) -> pa.Table:
    """Write one Parquet file (and overlays) for a batch; return one summary row."""
    status = batch.column("status").to_pylist()
    keep = [i for i, s in enumerate(status) if s != SKIP]
    n_skipped = len(status) - len(keep)
    rows = batch.take(pa.array(keep, pa.int64()))
    reasons = Counter(r for r in rows.column("error").to_pylist() if r)
    n_scored = sum(1 for i in keep if status[i] == OK)
    uri = ""
    if rows.num_rows:
        if overlays and "pixels" in rows.schema.names:
            _write_overlays(rows, out)
        uri = results.write_part(rows.select(list(results.COLUMNS)), out, run_date, model_version)
    t_read = batch.column("t_read").to_numpy()
    return pa.table(
        {
            "file": [uri],
            "n_scored": [n_scored],
            "n_errors": [rows.num_rows - n_scored],
            "n_skipped": [n_skipped],
            "reasons": [json.dumps(dict(reasons))],
            "t_first_read": [float(t_read.min()) if len(t_read) else time.time()],
            "t_written": [time.time()],
        }
    )


def _write_overlays(rows: pa.Table, out: str) -> None:
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
        storage.write_bytes(results.overlay_uri(out, image_id), encode_png(rgb))
