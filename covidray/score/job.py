"""The nightly rescoring job (``covidray score``): the Ray Data driver.

The stages (:mod:`.stages`) run as ``map_batches``: read + decode as tasks, at most
``read_tasks`` at a time; scoring in an actor pool (:func:`plan_actors`: one actor per GPU, or
one actor with a thread per core on CPUs); writes as tasks. The read and write stages mostly
wait on storage: they reserve no Ray CPU (a cap on how many run at once instead), so that the
scoring actors, the bottleneck, can have every CPU.

Incremental and idempotent: before reading anything the driver collects the ``image_id`` of
every row already written for this model version (a prediction or a decode error). Dataset
inputs are filtered before their bytes are read; prefix inputs are hashed and then dropped
without decoding. Since files are atomic and only complete files count, a run killed at any
point leaves complete batches only, and the next run scores exactly the rest. One run per
output at a time: a run holds the output's lock (:mod:`.lock`) from before it lists the inputs
to its end, and another run on the same output refuses to start (:class:`.lock.LockHeld`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from .. import storage
from ..config import secret_bytes
from ..drift import DriftLine, OutputMix, compare
from ..modeldir import WEIGHTS_NAME, _read_verified, read_card
from ..preprocess import check_card, contrast_method
from ..runtime.cluster import ensure_ray
from ..runtime.threads import physical_cores
from . import results
from .config import ScoreConfig
from .inputs import list_inputs
from .lock import OutputLock
from .stages import STAGE_COLUMNS, ScoreWorker, read_decode, write_batch

# Memory reserved per write task: the whole worker process that writes a file of rows_per_file
# scores (overlays included), torch and pyarrow loaded; Ray Data measured up to 533 MiB here.
WRITE_MEMORY_BYTES = 768 * 2**20


class ScoreResult(BaseModel):
    """What a scoring run did (printed by the CLI as a table and one JSON line)."""

    out: str
    model_version: str
    scoring_version: str
    run_date: str
    input_kind: str  # manifest | prefix
    n_inputs: int
    n_scored: int
    n_out_of_scope: int = 0  # refused by the input gate (a row each, counted by reason)
    n_errors: int
    n_retry: int = 0  # of the errors: read again on the next run
    n_skipped: int  # done already for this scoring version
    error_reasons: dict[str, int]
    gate_reasons: dict[str, int] = {}
    labels: dict[str, int] = {}  # predicted classes of the images scored in scope
    # Drift: this run's refusals by reason and class mix next to the model card's validation
    # split (covidray.drift); None/empty for a card without a reference or a run with no image.
    drift_reference: OutputMix | None = None
    drift: list[DriftLine] = []
    n_files: int
    elapsed_s: float  # first image read → last row written
    img_per_s: float  # (n_scored + n_out_of_scope) / elapsed_s
    startup_s: float  # Ray connection + actor start (model load), before the first read
    wall_s: float
    # Where the time went, in seconds summed over batches: list (the driver, before the first
    # read), fetch, decode, model (predict + Grad-CAM in the actors), encode (PNGs and rows),
    # write. ``actor_busy`` is model + encode over elapsed × actors: below 1 the actors waited
    # on the other stages or on Ray Data's scheduling between them.
    stage_s: dict[str, float] = {}
    actor_busy: float | None = None
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
    ``ray.available_resources()``) and this node's physical ``cores``. Asking for CUDA on a
    cluster without GPUs is an error here, not an actor that never starts."""
    if (cfg.device or "").startswith("cuda") and cluster.get("GPU", 0) <= 0:
        raise ValueError(
            f"--device {cfg.device}: the Ray cluster has no GPU; use --device cpu, or a cluster "
            "with GPUs"
        )
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


def run_score(
    cfg: ScoreConfig, on_plan: Callable[[str, int, int], None] | None = None
) -> ScoreResult:
    """:func:`score_unlocked` holding the output's lock (unless ``cfg.lock`` is off), then the
    run's drift against the card's reference, recorded under ``OUT/runs/`` (and exported as Ray
    metrics when this run used Ray)."""
    if not cfg.lock:
        return record_run(cfg, score_unlocked(cfg, on_plan))
    with OutputLock(cfg.out, stale_after_s=cfg.lock_stale_after_s, wait_s=cfg.lock_wait_s) as lock:
        return record_run(cfg, score_unlocked(cfg, on_plan, stop=lock.check))


def record_run(cfg: ScoreConfig, result: ScoreResult) -> ScoreResult:
    """``result`` with its drift lines, written as the run's record; Ray metrics of it."""
    mix = OutputMix.from_counts(
        result.n_scored + result.n_out_of_scope, result.gate_reasons, result.labels
    )
    if mix.n:
        result = result.model_copy(update={"drift": compare(mix, result.drift_reference)})
    # Counts, shares and timings; not where it wrote (a path says nothing about drift).
    record = result.model_dump(mode="json", exclude={"out"})
    results.write_run_record(
        cfg.out, result.run_date, result.scoring_version, record, cfg.write_retry_s
    )
    if mix.n:
        export_drift_metrics(result)
    return result


def export_drift_metrics(result: ScoreResult) -> None:
    """The run's shares and the reference's as Ray gauges (``covidray_nightly_share``, tags
    kind=refused|label, key=reason or class, source=run|validation), exported by the node's
    metrics agent like the endpoint's counters while the run's Ray is up."""
    import ray
    from ray.util import metrics

    if not ray.is_initialized():
        return
    gauge = metrics.Gauge(
        "covidray_nightly_share",
        "Nightly run: share of images refused by the input gate per reason (kind=refused), "
        "predicted class mix of those in scope (kind=label); source=run or validation.",
        tag_keys=("kind", "key", "source", "scoring_version"),
    )
    for line in result.drift:
        for source, value in (("run", line.share), ("validation", line.reference)):
            if value is not None:
                gauge.set(
                    value,
                    tags={
                        "kind": line.kind,
                        "key": line.key,
                        "source": source,
                        "scoring_version": result.scoring_version,
                    },
                )


def score_unlocked(
    cfg: ScoreConfig,
    on_plan: Callable[[str, int, int], None] | None = None,
    stop: Callable[[], None] | None = None,
) -> ScoreResult:
    """Score ``cfg.data`` with ``cfg.model`` into ``cfg.out`` (see the module docstring); the
    caller holds the output's lock (or runs without one).

    ``on_plan(kind, n_to_read, n_skipped)`` is called once the inputs are listed; ``stop()``
    before the first read and after each written batch: it raises when the run must stop
    writing (its lock was taken over, :class:`.lock.LockLost`).
    """
    import ray

    t_start = time.time()
    card = read_card(cfg.model)
    version, size = card.scoring_version, int(card.preprocessing.input_size)
    check_card(card.preprocessing)
    # A corrupted or missing weights file is refused here, in one line (ModelLoadError), not
    # as a scoring actor that dies while Ray Data waits for it.
    _read_verified(cfg.model, WEIGHTS_NAME, card.weights_sha256)
    run_date = cfg.run_date or datetime.now(UTC).date().isoformat()
    t_list = time.time()
    done = results.scored_ids(cfg.out, version)
    kind, items, n_skipped = list_inputs(cfg, done)
    t_list = time.time() - t_list
    if on_plan is not None:
        on_plan(kind, items.num_rows, n_skipped)
    result = ScoreResult(
        out=storage.normalize(cfg.out),
        model_version=card.model_version,
        scoring_version=version,
        run_date=run_date,
        input_kind=kind,
        n_inputs=items.num_rows + n_skipped,
        n_scored=0,
        n_errors=0,
        n_skipped=n_skipped,
        error_reasons={},
        drift_reference=card.drift_reference,
        n_files=0,
        elapsed_s=0.0,
        img_per_s=0.0,
        startup_s=0.0,
        wall_s=0.0,
    )
    if items.num_rows == 0:
        return result.model_copy(update={"wall_s": time.time() - t_start})
    if stop is not None:
        stop()

    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = cfg.wait_for_workers_s  # load the models before reading
    plan = plan_actors(cfg, ray.cluster_resources(), ray.available_resources(), physical_cores())
    chunk = cfg.read_chunk
    blocks = [items.slice(i, chunk) for i in range(0, items.num_rows, chunk)]
    key = secret_bytes(cfg.pseudonym_key)
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        read_decode,
        batch_size=chunk,
        batch_format="numpy",
        fn_kwargs={
            "size": size,
            "shorter_side": card.preprocessing.shorter_side,
            "contrast": contrast_method(card.preprocessing.contrast),
            "done": frozenset(done) if kind == "prefix" else frozenset(),
            "max_bytes": cfg.decode.max_bytes,
            "max_pixels": cfg.decode.max_pixels,
            "pseudonym_key": key,
            "keep_source_paths": cfg.keep_source_paths,
        },
        # Reads mostly wait on storage: no Ray CPU, a cap on how many run at once instead.
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=plan.read_tasks),
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
            "scoring_version": version,
            "overlays": cfg.overlays,
            "write_retry_s": cfg.write_retry_s,
        },
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=2),
        # A memory request keeps these zero-CPU tasks off nodes that offer no "memory"
        # resource (the chart's Ray heads: num-cpus 0, memory 0), like the reads.
        memory=WRITE_MEMORY_BYTES,
    )
    counts: Counter[str] = Counter(n_skipped=n_skipped)
    reasons: Counter[str] = Counter()
    gated: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    stage: Counter[str] = Counter()
    first_read, last_write = float("inf"), 0.0
    for summary in ds.iter_rows():
        if stop is not None:
            stop()
        for key in ("n_scored", "n_out_of_scope", "n_errors", "n_retry", "n_skipped"):
            counts[key] += int(summary[key])
        counts["n_files"] += bool(summary["file"])
        reasons.update(json.loads(summary["reasons"]))
        gated.update(json.loads(summary["gate_reasons"]))
        labels.update(json.loads(summary["labels"]))
        for k in (*STAGE_COLUMNS, "t_write_s"):
            stage[k[2:-2]] += float(summary.get(k) or 0.0)
        first_read = min(first_read, float(summary["t_first_read"]))
        last_write = max(last_write, float(summary["t_written"]))
    elapsed = max(last_write - first_read, 1e-9)
    n_scored = counts["n_scored"] + counts["n_out_of_scope"]  # through the model or gated
    busy = (stage["model"] + stage["encode"]) / (elapsed * plan.workers)
    return result.model_copy(
        update={
            **{k: counts[k] for k in ("n_scored", "n_out_of_scope", "n_errors", "n_retry")},
            "n_skipped": counts["n_skipped"],
            "n_files": counts["n_files"],
            "error_reasons": dict(reasons),
            "gate_reasons": dict(gated),
            "labels": dict(labels),
            "elapsed_s": round(elapsed, 3),
            "img_per_s": round(n_scored / elapsed, 2),
            "startup_s": round(max(0.0, first_read - t_start), 3),
            "wall_s": round(time.time() - t_start, 3),
            "stage_s": {"list": round(t_list, 3)} | {k: round(v, 3) for k, v in stage.items()},
            "actor_busy": round(busy, 3),
            "device": plan.device,
            "workers": plan.workers,
            "threads": plan.threads,
        }
    )
