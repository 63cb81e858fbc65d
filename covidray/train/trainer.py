"""Driver side of training: Ray Train setup, per-epoch progress, final evaluation, artifacts.

``run_training(cfg)`` starts a ``TorchTrainer`` whose checkpoints go to ``<out>/ray/<run name>``
(local or S3, through the same filesystem settings as covidray.storage), retries failed worker
groups from the latest checkpoint (``FailureConfig(max_failures)``), then, in one Ray task,
takes the best epoch's weights from the final checkpoint, scores them on val and test with
subgroup breakdowns and writes the model directory ``<out>/model`` (see covidray.modeldir).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

from pydantic import BaseModel

from .. import storage
from ..labels import CLASSES
from ..modeldir import ModelCard, save_model_dir
from ..raycluster import checkpoint_dir, ensure_ray, worker_runtime_env
from .config import TrainConfig
from .data import load_rows, training_data_hash
from .evaluate import evaluate_rows
from .loop import StepHook, default_threads, load_checkpoint, train_loop_per_worker

EpochCallback = Callable[[dict[str, Any]], None]


class TrainResult(BaseModel):
    """What a finished run produced."""

    model_uri: str
    model_version: str
    run_path: str  # Ray Train run folder (checkpoints)
    best_epoch: int
    reports: dict[str, dict[str, Any]]  # split -> EvalReport.to_json()
    history: list[dict[str, Any]]  # per-epoch metrics, across restarts
    wall_s: float


def epoch_line(m: dict[str, Any], epochs: int) -> str:
    """One human-readable line for an epoch's reported metrics."""
    flags = (
        " [yellow](resumed)[/yellow]" if m.get("resumed") and m["epoch"] == m["start_epoch"] else ""
    )
    return (
        f"epoch {m['epoch'] + 1:>3}/{epochs}  loss {m['train_loss']:.4f}  "
        f"val loss {m['val_loss']:.4f}  val macro-F1 {m['val_macro_f1']:.3f}  "
        f"acc {m['val_accuracy']:.3f}  COVID recall {m['val_covid_recall']:.3f}  "
        f"lr {m['lr']:.2e}  best {m['best_val_macro_f1']:.3f}@{m['best_epoch'] + 1}  "
        f"{m['epoch_s']:.0f} s{flags}"
    )


def default_printer(
    epochs: int, line: Callable[[dict[str, Any], int], str] = epoch_line
) -> EpochCallback:
    """An epoch callback printing ``line(metrics, epochs)`` (and worker failures) on stderr."""
    from rich.console import Console

    console = Console(stderr=True)

    def show(m: dict[str, Any]) -> None:
        if m.get("event") == "failure":
            console.print(f"[red]worker failure[/red] {m['errors']}: restarting from checkpoint")
        else:
            console.print(line(m, epochs), highlight=False)

    return show


def progress_callback(queue: Any) -> Any:
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


@contextmanager
def forwarded_progress(printer: EpochCallback, name: str) -> Iterator[Any]:
    """Yield a Ray Train callback whose reports (rank 0's epoch metrics, worker failures) a
    driver thread hands to ``printer``; the queue actor is removed on exit."""
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
            printer(item)

    thread = threading.Thread(target=pump, name=name, daemon=True)
    thread.start()
    try:
        yield progress_callback(queue)
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


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def worker_env() -> dict[str, Any]:
    """Runtime env of training/evaluation processes: AWS settings, and OpenMP threads that
    sleep rather than spin when idle (spinning threads on a shared, oversubscribed CPU burn
    ~10x the CPU time per step)."""
    env = worker_runtime_env()
    env_vars = dict(env.get("env_vars", {}))
    env_vars.setdefault("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    return {**env, "env_vars": env_vars}


class RaySettings(Protocol):
    """The run settings that :func:`fit_on_ray` reads (TrainConfig and GanConfig have them)."""

    out: str
    run_name: str | None
    workers: int
    use_gpu: bool | None
    max_failures: int
    num_to_keep: int


class RayRun(NamedTuple):
    result: Any  # ray.train.Result, with a checkpoint
    run_path: str  # the run's folder under <out>/ray (checkpoints)
    use_gpu: bool


def fit_on_ray(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    cfg: RaySettings,
    *,
    kind: str,
    printer: EpochCallback,
) -> RayRun:
    """Run ``loop`` on a ``TorchTrainer``: ``cfg.workers`` workers (a GPU each when the
    cluster has them, unless ``cfg.use_gpu`` says), checkpoints under ``<cfg.out>/ray/<run
    name>`` (S3 included), restarts from the latest checkpoint, progress lines through
    ``printer``. The run name is ``cfg.run_name`` or ``<kind>-<UTC time>-<random>``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray()
    use_gpu = cluster_has_gpus() if cfg.use_gpu is None else cfg.use_gpu
    storage_path, storage_fs, root = storage_args(cfg.out)
    name = cfg.run_name or f"{kind}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    resources = {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}
    with forwarded_progress(printer, f"covidray-{kind}-progress") as callback:
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
    return RayRun(result, storage.join(root, name), use_gpu)


def run_training(
    cfg: TrainConfig,
    *,
    on_epoch: EpochCallback | None = None,
    step_hook: StepHook | None = None,
) -> TrainResult:
    """Train on Ray, evaluate the best epoch on val and test, write ``<out>/model``.

    ``on_epoch(metrics)`` is called on the driver after every epoch, and with
    ``{"event": "failure", "errors": {rank: text}}`` when a worker group fails (default: a rich
    line on stderr); ``step_hook(epoch=, step=, rank=)`` runs on the workers before every step.
    """
    import ray

    started = time.time()
    rows = load_rows(cfg.data, cfg.augment_with)  # fail fast, before any worker starts
    splits = set(rows["split"])
    if not {"train", "val"} <= splits:
        raise ValueError(f"{cfg.data}: need labelled train and val rows (found {sorted(splits)})")

    run = fit_on_ray(
        train_loop_per_worker,
        {"cfg": cfg.model_dump(mode="json"), "step_hook": step_hook},
        cfg,
        kind="train",
        printer=on_epoch or default_printer(cfg.epochs),
    )

    # Final evaluation and the model directory: a Ray task with the workers' environment (and
    # a GPU when training had them), on this node when the output is a local folder.
    options: dict[str, Any] = {
        "num_cpus": 1,
        "num_gpus": 1 if run.use_gpu else 0,
        "runtime_env": worker_env(),
        "max_retries": 1,
    }
    if not storage.is_remote(cfg.out):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
    task = ray.remote(finalize_run).options(**options)
    return ray.get(
        task.remote(
            cfg.model_dump(mode="json"),
            run.result.checkpoint,
            run.run_path,
            run.use_gpu,
            started,
        )
    )


def finalize_run(
    cfg_dump: dict[str, Any], checkpoint: Any, run_path: str, use_gpu: bool, started: float
) -> TrainResult:
    """Best-epoch weights from the final checkpoint → val/test reports → ``<out>/model``."""
    import torch

    from ..models import build_model

    cfg = TrainConfig.model_validate(cfg_dump)
    torch.set_num_threads(cfg.torch_threads or default_threads(1))
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    with checkpoint_dir(checkpoint) as d:
        state, best_weights = load_checkpoint(d)
    model = build_model(cfg.backbone, len(CLASSES), None, head=cfg.head)
    model.load_state_dict(best_weights)
    model.eval().to(device)
    rows = load_rows(cfg.data, cfg.augment_with)
    reports = {}
    for split in ("val", "test"):
        split_rows = rows[rows["split"] == split].reset_index(drop=True)
        if not split_rows.empty:
            reports[split] = evaluate_rows(
                model,
                split_rows,
                cfg.input_size,
                tta_hflip=cfg.tta_hflip,
                batch_size=cfg.eval_batch_size,
            )
    model.cpu()
    history = list(state["history"])
    best = dict(state["best"])
    counts = rows.groupby(["split", "label"]).size()
    card = ModelCard.for_model(
        model,
        cfg.input_size,
        tta_hflip=cfg.tta_hflip,
        training_data_hash=training_data_hash(rows),
        training={
            "best_epoch": int(best["epoch"]),
            "best_val_macro_f1": float(best["macro_f1"]),
            "epochs_run": len(history),
            "restarts": sum(1 for h in history if h["resumed"] and h["epoch"] == h["start_epoch"]),
            "wall_s": time.time() - started,
            "workers": cfg.workers,
            "use_gpu": use_gpu,
            "run_path": run_path,
            "counts": {f"{s}/{lab}": int(n) for (s, lab), n in counts.items()},
            "history": history,
        },
        training_config=cfg.model_dump(mode="json"),
    )
    model_uri = storage.join(cfg.out, "model")
    card = save_model_dir(model, card, model_uri, reports)
    return TrainResult(
        model_uri=model_uri,
        model_version=card.model_version,
        run_path=run_path,
        best_epoch=int(best["epoch"]),
        reports={s: r.to_json() for s, r in reports.items()},
        history=history,
        wall_s=time.time() - started,
    )
