"""Options of ``covidray score`` (a pydantic model; YAML file + flags, see covidray.config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import Config, DecodeConfig, PseudonymKey
from ..sidecars import SIDECAR_SUFFIXES

# Files under an input prefix that are never images (sidecars of a dataset folder).
DEFAULT_EXCLUDE = SIDECAR_SUFFIXES


class ScoreConfig(Config):
    """`covidray score --model URI --data URI --out URI`."""

    model: str = Field(description="model directory (local or s3://)")
    data: str = Field(description="dataset (manifest.parquet or its folder), or a prefix of images")
    out: str = Field(description="output folder: predictions/ and overlays/")
    overlays: bool = Field(False, description="also write overlays/<image_id>.png")
    batch_size: int = Field(32, ge=1, le=4096, description="images per model call")
    workers: int | None = Field(
        None,
        ge=1,
        description="scoring actors (one model each); None: one per free GPU on CUDA, else one",
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs per actor without GPUs")
    threads: int | None = Field(
        None,
        ge=1,
        description="torch threads per actor; None: physical cores of this node / workers",
    )
    device: str | None = Field(
        None, description="cuda, cpu; default: cuda when the cluster has GPUs"
    )
    amp: bool | None = Field(None, description="autocast; default: on CUDA only")
    compile: bool = Field(False, description="torch.compile the backbone")
    omp_wait_policy: Literal["PASSIVE", "ACTIVE"] | None = Field(
        "PASSIVE",
        description="OpenMP wait policy of the actors: PASSIVE keeps idle threads from spinning, "
        "which on shared or oversubscribed CPUs is many times faster; None: inherit",
    )
    read_chunk: int = Field(64, ge=1, description="files per read/decode task batch")
    read_tasks: int | None = Field(
        None,
        ge=1,
        description="read/decode tasks at a time (each fetches its files concurrently); "
        "None: 1 for CPU actors, 4 per GPU actor",
    )
    decode_memory_mb: int = Field(768, ge=1, description="memory reserved per decode task")
    rows_per_file: int = Field(1024, ge=1, description="prediction rows per Parquet file")
    write_retry_s: float = Field(
        600.0,
        ge=0,
        description="retry a prediction file's write through transient storage errors (an "
        "outage) for this long, then fail the run (the rerun scores what has no row)",
    )
    run_date: str | None = Field(
        None, description="partition date YYYY-MM-DD (default: today, UTC)"
    )
    exclude_suffixes: tuple[str, ...] = Field(
        DEFAULT_EXCLUDE,
        description="prefix inputs: skip hidden files and files ending so (case-insensitive)",
    )
    wait_for_workers_s: int = Field(
        900, ge=0, description="wait this long for the actors (model load) before reading"
    )
    lock: bool = Field(
        True, description="hold OUT/_lock.json while running: one run per output at a time"
    )
    lock_stale_after_s: float = Field(
        600.0,
        gt=0,
        description="a lock without a heartbeat for this long is a crashed run's: taken over",
    )
    lock_wait_s: float = Field(
        0.0, ge=0, description="wait this long for another run's lock before giving up"
    )
    decode: DecodeConfig = DecodeConfig()
    pseudonym_key: PseudonymKey
    keep_source_paths: bool = Field(
        False,
        description="with a pseudonym key, keep source paths in the uri column anyway (else "
        "image:<image_id>): only for research sets whose file names identify no one",
    )
