"""Ray Train runs: the ``TorchTrainer`` set-up shared by the classifier and the CycleGAN,
checkpoints that survive restarts, and epoch progress forwarded to the driver.

The training loops themselves (``covidray.train.loop``, ``covidray.gan.train``) call
:func:`report_with_checkpoint` and :func:`checkpoint_dir`; the drivers call
:func:`fit_on_ray`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

from .. import storage
from .cluster import cluster_has_gpus, ensure_ray, worker_runtime_env

EpochCallback = Callable[[dict[str, Any]], None]
log = logging.getLogger(__name__)


def worker_env() -> dict[str, Any]:
    """Runtime env of training and evaluation processes: :func:`worker_runtime_env` plus
    OpenMP threads that sleep rather than spin when idle (spinning threads on a shared,
    oversubscribed CPU burn many times the CPU time per step)."""
    env = worker_runtime_env()
    env_vars = dict(env.get("env_vars", {}))
    env_vars.setdefault("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    return {**env, "env_vars": env_vars}


@contextlib.contextmanager
def checkpoint_dir(checkpoint: Any) -> Iterator[str]:
    """A local folder holding a Ray Train checkpoint's files, private to this process.

    ``Checkpoint.as_directory()`` downloads a remote checkpoint into a folder named after the
    checkpoint's id, shared by every process on the node that holds a copy of the same
    Checkpoint object, as all workers of a restarted group do. It downloads whenever no other
    process is downloading at that moment: a worker arriving after another's download has
    finished downloads again into the same folder, rewriting the files the first one may still
    be reading (``torch.load``: "PytorchStreamReader failed reading file ... file read failed"),
    and the last one out deletes the folder. Here each process downloads its own copy, removed
    on exit; a local checkpoint is read in place, as Ray does.
    """
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    with tempfile.TemporaryDirectory(prefix="covidray-restore-") as tmp:
        yield checkpoint.to_directory(tmp)


def report_with_checkpoint(
    metrics: dict[str, Any], save: Callable[[str], None] | None, prefix: str = "covidray-ckpt-"
) -> None:
    """``ray.train.report`` from a Train worker; ``save(folder)`` (rank 0 only, others pass
    None) writes the checkpoint's files into a temporary folder that Ray then persists."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        checkpoint = None
        if save is not None:
            save(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world size)`` of this Train worker."""
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def restored_checkpoint() -> Any:
    """The checkpoint this worker group restarts from, or None on a fresh start."""
    import ray.train

    return ray.train.get_checkpoint()


def prepare_model(model: Any) -> Any:
    """The model on this worker's device, wrapped in DDP when there are several workers."""
    import ray.train.torch

    return ray.train.torch.prepare_model(model)


def train_device() -> Any:
    """This Train worker's torch device (its GPU, or the CPU)."""
    import ray.train.torch

    return ray.train.torch.get_device()


def _progress_callback(queue: Any) -> Any:
    """A Ray Train UserCallback (runs in the controller) forwarding rank 0's metrics."""
    from ray.train import UserCallback

    class _ForwardMetrics(UserCallback):
        def __init__(self, q: Any) -> None:
            self.q = q

        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            if metrics:
                self.q.actor.put_nowait.remote(dict(metrics[0]))  # fire and forget

        def after_exception(self, run_context: Any, worker_exceptions: dict) -> None:
            errors = {
                int(r): f"{type(e).__name__}: {e}"[:300] for r, e in worker_exceptions.items()
            }
            self.q.actor.put_nowait.remote({"event": "failure", "errors": errors})

    return _ForwardMetrics(queue)


@contextlib.contextmanager
def forwarded_progress(on_epoch: EpochCallback, name: str) -> Iterator[Any]:
    """Yield a Ray Train callback whose reports (rank 0's epoch metrics, and
    ``{"event": "failure", "errors": {rank: text}}`` when a worker group fails) a driver
    thread hands to ``on_epoch``; the queue actor is removed on exit."""
    import ray
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})
    done = threading.Event()

    def pump() -> None:
        while not done.is_set():
            try:
                item = queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # the queue actor went away: nothing more to show
                return
            try:
                on_epoch(item)
            except Exception:  # a display bug must not stop the reports that follow
                log.exception("on_epoch failed for %s", item.get("event", "an epoch"))

    thread = threading.Thread(target=pump, name=name, daemon=True)
    thread.start()
    try:
        yield _progress_callback(queue)
    finally:
        time.sleep(0.5)  # let the last epoch line through
        done.set()
        thread.join(timeout=5)
        ray.kill(queue.actor)


def storage_args(out: str) -> tuple[str, Any, str]:
    """``(storage_path, storage_filesystem, run root URI)`` for Ray Train's RunConfig: the
    ``ray`` folder under ``out``, local or on object storage."""
    root = storage.normalize(storage.join(out, "ray"))
    if storage.is_remote(root):
        fs, path = storage.pyarrow_filesystem(root)
        return path, fs, root
    storage.makedirs(root)
    return root, None, root


class RaySettings(Protocol):
    """The run settings that :func:`fit_on_ray` reads (TrainConfig and GanConfig have them)."""

    out: str
    run_name: str | None
    workers: int
    use_gpu: bool | None
    max_failures: int
    num_to_keep: int


class RayRun(NamedTuple):
    checkpoint: Any  # ray.train.Checkpoint of the last report
    run_path: str  # the run's folder under <out>/ray (checkpoints)
    use_gpu: bool


def fit_on_ray(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    cfg: RaySettings,
    *,
    kind: str,
    on_epoch: EpochCallback,
) -> RayRun:
    """Run ``loop`` on a ``TorchTrainer``: ``cfg.workers`` workers (a GPU each when the
    cluster has them, unless ``cfg.use_gpu`` says), checkpoints under ``<cfg.out>/ray/<run
    name>`` (S3 included), restarts from the latest checkpoint, each report handed to
    ``on_epoch`` on the driver. The run name is ``cfg.run_name`` or ``<kind>-<UTC time>-<random>``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray()
    use_gpu = cluster_has_gpus() if cfg.use_gpu is None else cfg.use_gpu
    storage_path, storage_fs, root = storage_args(cfg.out)
    name = cfg.run_name or f"{kind}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    resources = {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}
    with forwarded_progress(on_epoch, f"covidray-{kind}-progress") as callback:
        trainer = TorchTrainer(
            loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
                worker_runtime_env=worker_env(),
                callbacks=[callback],
            ),
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{kind} run {name} finished without a checkpoint")
    return RayRun(result.checkpoint, storage.join(root, name), use_gpu)
