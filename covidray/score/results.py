"""The prediction files of ``covidray score``: schema, names, writing and reading.

Layout under the job's output folder ``OUT``::

    OUT/predictions/run_date=YYYY-MM-DD/part-<scoring_version>-<digest>.parquet
    OUT/overlays/<image_id>.png                  (only with --overlays)
    OUT/runs/run_date=YYYY-MM-DD/run-<UTC time>-<scoring_version>.json   (each run's summary)

Each Parquet file holds one batch of rows and is written in one atomic PUT / rename
(:func:`covidray.storage.write_parquet`), so a reader (or a rerun) only ever sees complete
files. ``<digest>`` is derived from the rows' keys (``image_id``, or ``uri`` for rows without
one): a batch that is retried writes the same name again instead of a second copy. A done row
(:data:`DONE`) counts for its ``(image_id, scoring_version)``; reruns skip those, so re-running
after a crash adds only what is missing, and images whose rows say retry are read again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from .. import storage
from ..labels import CLASSES

PREDICTIONS_DIR = "predictions"
RUNS_DIR = "runs"  # one JSON record per run: its summary and drift (covidray.drift)
OVERLAYS_DIR = "overlays"
PARTITION_KEY = "run_date"

# What a row says about its image (the ``status`` column). Done rows are not read again for
# their scoring version: scored; out of scope (the input gate refused it, scores kept when the
# image layer decided); failed (the bytes, whose hash is known, cannot be decoded). Retry rows
# are tried again on the next run: unreadable (a storage error, an outage).
SCORED, OUT_OF_SCOPE, FAILED, RETRY = "scored", "out_of_scope", "failed", "retry"
DONE = frozenset({SCORED, OUT_OF_SCOPE, FAILED})

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),  # sha256 of the raw bytes; null if unreadable
        pa.field("uri", pa.string(), nullable=False),  # where the image is
        pa.field("patient_id", pa.string()),  # pseudonymous, as in the manifest
        pa.field("study_day", pa.float32()),
        pa.field("study_date", pa.string()),
        *[pa.field(f"prob_{c}", pa.float32()) for c in CLASSES],
        pa.field("label", pa.string()),  # predicted class; null when out of scope
        pa.field("status", pa.string()),  # scored | out_of_scope | failed | retry
        pa.field("in_scope", pa.bool_()),  # the input gate's verdict
        # modality:CT, view:LL (the header), ood_image (the image distance), image_view:lateral
        # (the view check: the image decides even when the header said PA or AP)
        pa.field("gate_reason", pa.string()),
        pa.field("view", pa.string()),  # the header's (or manifest's) view position, as given
        pa.field("ood_score", pa.float32()),  # the gate's image-layer score
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("scoring_version", pa.string()),  # weights + every card field that matters
        pa.field("cam_area", pa.float32()),
        pa.field("cam_peak_y", pa.float32()),
        pa.field("cam_peak_x", pa.float32()),
        pa.field("cam_border_energy", pa.float32()),
        pa.field("cam_png", pa.binary()),  # raw Grad-CAM at the target layer, 8-bit PNG
        # COVID-class map on the model's fixed scale (explain.fixed), comparable across studies;
        # null when the model card has no cam_covid_scale or the row has no patient_id
        pa.field("cam_covid_area", pa.float32()),
        pa.field("cam_covid_png", pa.binary()),
        pa.field("error", pa.string()),  # reason code (decode.DecodeReason or unreadable...)
        pa.field("error_detail", pa.string()),
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)
READ_SCHEMA = SCHEMA.append(pa.field(PARTITION_KEY, pa.string()))


def predictions_root(uri: str) -> str:
    """``OUT`` or ``OUT/predictions`` → the predictions folder."""
    uri = storage.normalize(uri)
    return uri if storage.basename(uri) == PREDICTIONS_DIR else storage.join(uri, PREDICTIONS_DIR)


def partition_uri(out: str, run_date: str) -> str:
    return storage.join(predictions_root(out), f"{PARTITION_KEY}={run_date}")


def overlay_uri(out: str, image_id: str) -> str:
    return storage.join(storage.normalize(out), OVERLAYS_DIR, f"{image_id}.png")


def part_name(keys: Iterable[str], model_version: str) -> str:
    """Deterministic file name for a batch with these row keys (order does not matter)."""
    digest = hashlib.sha256("\n".join(sorted(keys)).encode("utf-8")).hexdigest()[:24]
    return f"part-{model_version}-{digest}.parquet"


def row_key(image_id: str | None, uri: str) -> str:
    return image_id if image_id else f"uri:{uri}"


def write_part(table: pa.Table, out: str, run_date: str, version: str, retry_s: float = 0.0) -> str:
    """Write one batch atomically under its deterministic name; returns its URI. Transient
    storage errors are retried for ``retry_s`` seconds (the name makes a retry idempotent);
    then :class:`covidray.storage.StorageUnavailable`."""
    keys = (
        row_key(i, u)
        for i, u in zip(
            table.column("image_id").to_pylist(), table.column("uri").to_pylist(), strict=True
        )
    )
    uri = storage.join(partition_uri(out, run_date), part_name(keys, version))
    storage.write_parquet(table.cast(SCHEMA), uri, retry_s=retry_s)
    return uri


def fresh_listing(uri: str) -> None:
    """Drop this process's cached S3 listings under ``uri``: other processes (Ray workers,
    other runs) write there, and s3fs would otherwise answer from a stale listing."""
    fs, path = storage.filesystem(uri)
    fs.invalidate_cache(path)  # the folder and its parents; s3fs keeps the subfolders
    cache = getattr(fs, "dircache", None)
    if cache is not None:
        for key in [k for k in list(cache) if k.startswith(path.rstrip("/") + "/")]:
            cache.pop(key, None)


def list_files(uri: str) -> list[str]:
    """The prediction files under ``uri`` (``OUT``, ``OUT/predictions`` or one .parquet)."""
    if uri.endswith(".parquet") and not storage.isdir(uri):
        return [uri]
    root = predictions_root(uri)
    fresh_listing(root)
    if not storage.exists(root):
        return []
    return [
        f
        for f in storage.walk_files(root)
        if f.endswith(".parquet") and not storage.basename(f).startswith(("_", "."))
    ]


def read_predictions(
    uri: str,
    columns: Sequence[str] | None = None,
    model_version: str | None = None,
    dedupe: bool = False,
) -> pa.Table:
    """All prediction rows under ``uri`` (with a ``run_date`` column), optionally one model's.

    ``dedupe`` keeps the most recent row per ``(image_id, model_version)`` (per ``uri`` for rows
    without an image_id); the job itself never writes two, but copies merged by hand might.
    """
    wanted = list(columns) if columns else list(READ_SCHEMA.names)
    if dedupe:
        wanted += [c for c in ("image_id", "uri", "model_version", "scored_at") if c not in wanted]
    files = list_files(uri)
    if not files:
        return READ_SCHEMA.empty_table().select(wanted)
    fs, _ = storage.pyarrow_filesystem(files[0])
    paths = [storage.filesystem(f)[1] for f in files]
    single = len(files) == 1 and not storage.isdir(uri)
    dataset = pads.dataset(
        paths,
        schema=SCHEMA if single else READ_SCHEMA,
        format="parquet",
        filesystem=fs,
        partitioning=None
        if single
        else pads.partitioning(pa.schema([pa.field(PARTITION_KEY, pa.string())]), flavor="hive"),
        partition_base_dir=None if single else storage.filesystem(predictions_root(uri))[1],
    )
    filt = pc.field("model_version") == model_version if model_version else None
    read_cols = [c for c in wanted if c in dataset.schema.names]
    table = dataset.to_table(columns=read_cols, filter=filt)
    if PARTITION_KEY in wanted and PARTITION_KEY not in read_cols:
        table = table.append_column(PARTITION_KEY, pa.nulls(table.num_rows, pa.string()))
    table = table.select(wanted)
    if dedupe and table.num_rows:
        table = _latest(table)
    return table.select(list(columns)) if columns else table


def _latest(table: pa.Table) -> pa.Table:
    ids = table.column("image_id").to_pylist()
    uris = table.column("uri").to_pylist()
    versions = table.column("model_version").to_pylist()
    times = table.column("scored_at").to_pylist()
    best: dict[tuple[str, str], int] = {}
    for i, (image_id, u, v, t) in enumerate(zip(ids, uris, versions, times, strict=True)):
        key = (row_key(image_id, u), v)
        j = best.get(key)
        if j is None or (t is not None and (times[j] is None or t > times[j])):
            best[key] = i
    return table.take(pa.array(sorted(best.values()), pa.int64()))


def scored_ids(out: str, scoring_version: str) -> set[str]:
    """image_ids with a done row (scored, out of scope, failed) for this scoring version; an
    image whose rows all say retry is read again."""
    table = read_predictions(out, columns=["image_id", "status", "scoring_version"])
    ids = table.column("image_id").to_pylist()
    statuses = table.column("status").to_pylist()
    versions = table.column("scoring_version").to_pylist()
    return {
        i
        for i, s, v in zip(ids, statuses, versions, strict=True)
        if i and v == scoring_version and s in DONE
    }


def write_run_record(
    out: str, run_date: str, scoring_version: str, summary: Mapping[str, Any], retry_s: float = 0.0
) -> str:
    """Write a run's summary (JSON-able: the job's ScoreResult, less where it wrote) as
    ``OUT/runs/run_date=D/run-<UTC time>-<scoring_version>.json``, through transient storage
    errors for ``retry_s`` seconds; returns its URI."""
    import json
    from datetime import UTC, datetime

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    uri = storage.join(
        storage.normalize(out),
        RUNS_DIR,
        f"{PARTITION_KEY}={run_date}",
        f"run-{stamp}-{scoring_version}.json",
    )
    data = (json.dumps(dict(summary), indent=1) + "\n").encode()
    storage.write_bytes(uri, data, retry_s=retry_s)
    return uri


def read_run_records(uri: str) -> list[dict[str, Any]]:
    """Every run record of the output ``uri`` (``OUT`` or ``OUT/predictions``; none for one
    .parquet file) as JSON objects, oldest first."""
    import json

    if uri.endswith(".parquet") and not storage.isdir(uri):
        return []
    root = storage.join(storage.parent(predictions_root(uri)), RUNS_DIR)
    fresh_listing(root)
    if not storage.exists(root):
        return []
    files = sorted(
        (f for f in storage.walk_files(root) if f.endswith(".json")), key=storage.basename
    )
    return [json.loads(storage.read_text(f)) for f in files]
