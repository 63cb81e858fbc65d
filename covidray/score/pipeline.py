"""The nightly rescoring job (``covidray score``): a Ray Data pipeline.

Stages (each a ``map_batches``):

1. **read + decode** (tasks, ``read_chunk`` files each, at most ``read_tasks`` at a time):
   fetch the bytes concurrently, ``image_id`` = sha256 of the raw bytes (a manifest's own
   ``image_id`` for datasets, which ingest computed the same way from the original file),
   decode, squash-resize to the model's input size and keep it as uint8 (``S×S``, 50 KB at
   224: small blocks to move). A file that cannot be read or decoded becomes a row with
   ``error``/``error_detail``; nothing raises.
2. **score** (an actor pool, :func:`plan_actors`: one actor per GPU, or one actor with a
   thread per core): each actor holds one :class:`covidray.predict.Predictor`
   and adds probabilities, label and Grad-CAM (summary numbers and the raw map as a PNG).
3. **write** (tasks, ``rows_per_file`` rows each): optional overlay PNGs, then one Parquet
   file per batch through :func:`covidray.score.results.write_part` (atomic, deterministic
   name). The overlays are written first, so a Parquet file is the batch's commit record.

The read and write stages mostly wait on storage: they reserve no Ray CPU (a cap on how many
run at once instead), so that the scoring actors, the bottleneck, can have every CPU.

Incremental and idempotent: before reading anything the driver collects the ``image_id`` of
every row already written for this model version (a prediction or a decode error). Dataset
inputs are filtered before their bytes are read; prefix inputs are hashed and then dropped
without decoding. Since files are atomic and only complete files count, a run killed at any
point leaves complete batches only, and the next run scores exactly the rest. (Two runs on the
same output at the same time could both score an image: schedule one at a time.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from .. import storage
from ..decode import DecodeError, decode_array, dicom_tags, is_dicom
from ..manifest import MANIFEST_NAME, manifest_base, read_manifest
from ..modeldir import read_card
from . import results
from .config import ScoreConfig

log = logging.getLogger(__name__)

ITEM_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("patient_id", pa.string()),
        pa.field("study_day", pa.float32()),
        pa.field("study_date", pa.string()),
        pa.field("size", pa.int64()),
    ]
)
# status of a row between stages: scored, an error row, or already done (only counted)
OK, ERROR, SKIP = "ok", "error", "skip"


class ScoreResult(BaseModel):
    """What a scoring run did (printed by the CLI as a table and one JSON line)."""

    out: str
    model_version: str
    run_date: str
    input_kind: str  # manifest | prefix
    n_inputs: int
    n_scored: int
    n_errors: int
    n_skipped: int  # already scored by this model version
    error_reasons: dict[str, int]
    n_files: int
    elapsed_s: float  # first image read → last row written
    img_per_s: float  # n_scored / elapsed_s
    startup_s: float  # Ray connection + actor start (model load), before the first read
    wall_s: float
    device: str = ""  # the scoring actors'
    workers: int = 0
    threads: int = 0


class ActorPlan(BaseModel):
    """How the scoring stage runs: where, how many actors, threads and Ray resources each."""

    device: str
    workers: int
    threads: int
    resources: dict[str, float]
    read_tasks: int


def plan_actors(
    cfg: ScoreConfig, cluster: dict[str, float], available: dict[str, float], cores: int
) -> ActorPlan:
    """Resolve the config's defaults against the cluster (``ray.cluster_resources()``,
    ``ray.available_resources()``) and this node's physical ``cores``."""
    use_gpu = cluster.get("GPU", 0) > 0 and cfg.device in (None, "cuda")
    device = "cuda" if use_gpu else (cfg.device or "cpu")
    if device == "cuda":
        resources = {"num_gpus": 1.0}
        auto = max(1, int(available.get("GPU", 0)))
    else:  # one actor using every core beat one single-threaded actor per core (bench/score.py)
        resources = {"num_cpus": cfg.cpus_per_worker}
        auto = 1
    workers = cfg.workers or auto
    threads = cfg.threads or max(1, cores // workers)
    read_tasks = cfg.read_tasks or (4 * workers if device == "cuda" else 1)
    return ActorPlan(
        device=device, workers=workers, threads=threads, resources=resources, read_tasks=read_tasks
    )


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def is_dataset(uri: str) -> bool:
    if uri.endswith(".parquet"):
        return True
    return storage.exists(storage.join(uri, MANIFEST_NAME))


def list_inputs(cfg: ScoreConfig, done: set[str]) -> tuple[str, pa.Table, int]:
    """``(kind, items, n_skipped)``: the images to read, in a stable order.

    A dataset's rows already scored (``done``) are dropped here; a prefix's files are all
    listed (their image_id is only known after reading them).
    """
    if is_dataset(cfg.data):
        manifest = read_manifest(cfg.data)
        base = manifest_base(cfg.data)
        n = manifest.num_rows

        def col(name: str, typ: pa.DataType) -> list:
            if name not in manifest.schema.names:
                return [None] * n
            return manifest.column(name).cast(typ).to_pylist()

        ids = col("image_id", pa.string())
        keep = [i for i, image_id in enumerate(ids) if image_id not in done]
        uris = col("uri", pa.string())
        cols = {
            "image_id": [ids[i] for i in keep],
            "uri": [storage.resolve(base, uris[i]) for i in keep],
            "size": [None] * len(keep),
        }
        for name, typ in (
            ("patient_id", pa.string()),
            ("study_day", pa.float32()),
            ("study_date", pa.string()),
        ):
            values = col(name, typ)
            cols[name] = [values[i] for i in keep]
        table = pa.Table.from_pydict(cols, schema=ITEM_SCHEMA)
        return "manifest", table, n - len(keep)

    results.fresh_listing(cfg.data)
    fs, path = storage.filesystem(cfg.data)
    if not fs.isdir(path):
        raise FileNotFoundError(f"--data is neither a dataset nor a folder: {cfg.data}")
    out_path = storage.filesystem(cfg.out)[1].rstrip("/") + "/"
    found = fs.find(path, detail=True)
    suffixes = tuple(s.lower() for s in cfg.exclude_suffixes)
    uris, sizes = [], []
    for p in sorted(found):
        name = p.rsplit("/", 1)[-1]
        if name.startswith(".") or name.lower().endswith(suffixes) or p.startswith(out_path):
            continue
        uris.append(storage.to_uri(p, cfg.data))
        sizes.append(found[p].get("size"))
    n = len(uris)
    table = pa.Table.from_pydict(
        {
            "image_id": [None] * n,
            "uri": uris,
            "patient_id": [None] * n,
            "study_day": [None] * n,
            "study_date": [None] * n,
            "size": sizes,
        },
        schema=ITEM_SCHEMA,
    )
    return "prefix", table, 0


# --------------------------------------------------------------------------------------------
# Stage 1: read + decode (CPU tasks)
# --------------------------------------------------------------------------------------------


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

    from ..ingest import pseudonymize
    from ..preprocess import to_model_input, to_uint8

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
            pixels[i] = to_uint8(x)[0].numpy()
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


# --------------------------------------------------------------------------------------------
# Stage 2: score (actor pool)
# --------------------------------------------------------------------------------------------


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
        from ..predict import encode_cam_png

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
                pngs[i] = encode_cam_png(res.cam_raw[j])
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


# --------------------------------------------------------------------------------------------
# Stage 3: write (CPU tasks)
# --------------------------------------------------------------------------------------------


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
    from ..predict import decode_cam_png

    pixels = rows.column("pixels").combine_chunks().to_numpy()
    for i, (image_id, png) in enumerate(
        zip(rows.column("image_id").to_pylist(), rows.column("cam_png").to_pylist(), strict=True)
    ):
        if png is None or image_id is None:
            continue
        cam = torch.from_numpy(decode_cam_png(png).astype(np.float32) / 255.0)
        rgb = overlay(pixels[i], cam, alpha=0.4)
        storage.write_bytes(results.overlay_uri(out, image_id), _png_rgb(rgb))


def _png_rgb(rgb: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, "PNG", compress_level=6)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


def run_score(
    cfg: ScoreConfig, on_plan: Callable[[str, int, int], None] | None = None
) -> ScoreResult:
    """Score ``cfg.data`` with ``cfg.model`` into ``cfg.out`` (see the module docstring).

    ``on_plan(kind, n_to_read, n_skipped)`` is called once the inputs are listed.
    """
    import ray

    from ..raycluster import ensure_ray

    t_start = time.time()
    card = read_card(cfg.model)
    version, size = card.model_version, int(card.preprocessing.input_size)
    run_date = cfg.run_date or datetime.now(UTC).date().isoformat()
    done = results.scored_ids(cfg.out, version)
    kind, items, n_skipped = list_inputs(cfg, done)
    if on_plan is not None:
        on_plan(kind, items.num_rows, n_skipped)
    result = ScoreResult(
        out=storage.normalize(cfg.out),
        model_version=version,
        run_date=run_date,
        input_kind=kind,
        n_inputs=items.num_rows + n_skipped,
        n_scored=0,
        n_errors=0,
        n_skipped=n_skipped,
        error_reasons={},
        n_files=0,
        elapsed_s=0.0,
        img_per_s=0.0,
        startup_s=0.0,
        wall_s=0.0,
    )
    if items.num_rows == 0:
        return result.model_copy(update={"wall_s": time.time() - t_start})

    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = cfg.wait_for_workers_s  # load the models before reading
    from ..predict import physical_cores

    plan = plan_actors(cfg, ray.cluster_resources(), ray.available_resources(), physical_cores())
    chunk = cfg.read_chunk
    blocks = [items.slice(i, chunk) for i in range(0, items.num_rows, chunk)]
    key = cfg.pseudonym_key.get_secret_value().encode() if cfg.pseudonym_key else None
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        read_decode,
        batch_size=chunk,
        batch_format="numpy",
        fn_kwargs={
            "size": size,
            "done": frozenset(done) if kind == "prefix" else frozenset(),
            "max_bytes": cfg.decode.max_bytes,
            "max_pixels": cfg.decode.max_pixels,
            "pseudonym_key": key,
        },
        # Reads mostly wait on storage: no Ray CPU, a cap on how many run at once instead.
        num_cpus=0,
        concurrency=plan.read_tasks,
        # Room for one large decode; also, resources that differ from the actors' keep Ray
        # Data from fusing this stage into the actor pool: decoding stays in its own tasks.
        memory=cfg.decode_memory_mb * 2**20,
    )
    # Every worker has the job's runtime env (AWS settings, malloc tunables: ensure_ray); the
    # actors add their OpenMP wait policy, read when their process loads OpenMP.
    actor_env: dict[str, Any] = {}
    if cfg.omp_wait_policy:
        actor_env["env_vars"] = {"OMP_WAIT_POLICY": cfg.omp_wait_policy}
    ds = ds.map_batches(
        ScoreWorker,
        fn_constructor_kwargs={
            "model_uri": cfg.model,
            "device": plan.device,
            "threads": plan.threads,
            "amp": cfg.amp,
            "compile": cfg.compile,
            "keep_pixels": cfg.overlays,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.workers),
        runtime_env=actor_env or None,
        **plan.resources,
    )
    ds = ds.map_batches(
        write_batch,
        batch_size=cfg.rows_per_file,
        batch_format="pyarrow",
        fn_kwargs={
            "out": cfg.out,
            "run_date": run_date,
            "model_version": version,
            "overlays": cfg.overlays,
        },
        num_cpus=0,
        concurrency=2,
    )
    reasons: Counter[str] = Counter()
    n_scored = n_errors = n_files = 0
    first_read, last_write = float("inf"), 0.0
    for summary in ds.iter_rows():
        n_scored += int(summary["n_scored"])
        n_errors += int(summary["n_errors"])
        n_skipped += int(summary["n_skipped"])
        n_files += bool(summary["file"])
        reasons.update(json.loads(summary["reasons"]))
        first_read = min(first_read, float(summary["t_first_read"]))
        last_write = max(last_write, float(summary["t_written"]))
    elapsed = max(last_write - first_read, 1e-9)
    return result.model_copy(
        update={
            "n_scored": n_scored,
            "n_errors": n_errors,
            "n_skipped": n_skipped,
            "error_reasons": dict(reasons),
            "n_files": n_files,
            "elapsed_s": round(elapsed, 3),
            "img_per_s": round(n_scored / elapsed, 2),
            "startup_s": round(max(0.0, first_read - t_start), 3),
            "wall_s": round(time.time() - t_start, 3),
            "device": plan.device,
            "workers": plan.workers,
            "threads": plan.threads,
        }
    )


def summary_table(result: ScoreResult) -> Any:
    """A rich table of a run's counts and throughput."""
    from rich.table import Table

    table = Table(title=f"model {result.model_version}, run_date={result.run_date}")
    table.add_column("")
    table.add_column("", justify="right")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(result.error_reasons.items()))
    for name, value in (
        ("inputs", result.n_inputs),
        ("scored", result.n_scored),
        ("skipped (already scored)", result.n_skipped),
        ("errors", f"{result.n_errors}" + (f" ({reasons})" if reasons else "")),
        ("files written", result.n_files),
        ("scoring actors", f"{result.workers} × {result.threads} thread(s) on {result.device}"),
        ("img/s (first read → last write)", f"{result.img_per_s:.1f}"),
        ("scoring time", f"{result.elapsed_s:.1f} s"),
        ("startup (Ray, model load)", f"{result.startup_s:.1f} s"),
        ("wall time", f"{result.wall_s:.1f} s"),
    ):
        table.add_row(name, str(value))
    table.add_row("output", results.predictions_root(result.out))
    return table
