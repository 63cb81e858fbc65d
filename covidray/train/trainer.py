"""Driver side of training: Ray Train setup, per-epoch progress, final evaluation, artifacts.

``run_training(cfg)`` starts a ``TorchTrainer`` whose checkpoints go to ``<out>/ray/<run name>``
(local or S3, through the same filesystem settings as covidray.storage), retries failed worker
groups from the latest checkpoint (``FailureConfig(max_failures)``), then, in one Ray task,
takes the best epoch's weights from the final checkpoint, scores them on val and test with
subgroup breakdowns and writes the model directory ``<out>/model`` (see covidray.modeldir).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import BaseModel

from .. import storage
from ..dataset import load_rows, load_view_rows, shorter_side, training_data_hash
from ..evaluation.evaluate import evaluate_val_test
from ..heldout import held_out_sources
from ..labels import CLASSES
from ..modeldir import WEIGHTS_NAME, ModelCard, read_card, save_model_dir
from ..posthoc import fit_outputs
from ..preprocess import check_card, contrast_method
from ..runtime.cluster import call_on_worker
from ..runtime.threads import threads_per_worker
from ..runtime.train import EpochCallback, checkpoint_dir, fit_on_ray, worker_env
from .config import TrainConfig
from .loop import StepHook, load_checkpoint, train_loop_per_worker

log = logging.getLogger(__name__)


class TrainResult(BaseModel):
    """What a finished run produced."""

    model_uri: str
    model_version: str
    run_path: str  # Ray Train run folder (checkpoints)
    best_epoch: int
    reports: dict[str, dict[str, Any]]  # split -> EvalReport.to_json()
    history: list[dict[str, Any]]  # per-epoch metrics, across restarts
    wall_s: float


def _log_epoch(metrics: dict[str, Any]) -> None:
    log.info("train epoch report: %s", metrics)


def run_training(
    cfg: TrainConfig,
    *,
    on_epoch: EpochCallback | None = None,
    step_hook: StepHook | None = None,
) -> TrainResult:
    """Train on Ray, evaluate the best epoch on val and test, write ``<out>/model``.

    ``on_epoch(metrics)`` is called on the driver after every epoch, and with
    ``{"event": "failure", "errors": {rank: text}}`` when a worker group fails (default:
    logged); ``step_hook(epoch=, step=, rank=)`` runs on the workers before every step.
    """
    started = time.time()
    cfg, parent = resolve_parent(cfg)
    rows = load_rows(cfg.data, cfg.augment_with)  # fail fast, before any worker starts
    if cfg.views:
        load_view_rows(cfg.views)
    side = shorter_side(rows)  # one ingest normalisation for the whole card, or a refusal
    if parent is not None and side != parent.preprocessing.shorter_side:
        raise ValueError(
            f"the data were ingested at a shorter side of {side} px, the model to fine-tune at "
            f"{parent.preprocessing.shorter_side} px: re-ingest them with --size "
            f"{parent.preprocessing.shorter_side}"
        )
    splits = set(rows["split"])
    if not {"train", "val"} <= splits:
        raise ValueError(f"{cfg.data}: need labelled train and val rows (found {sorted(splits)})")

    run = fit_on_ray(
        train_loop_per_worker,
        {"cfg": cfg.model_dump(mode="json"), "step_hook": step_hook},
        cfg,
        kind="train",
        on_epoch=on_epoch or _log_epoch,
    )

    # Final evaluation and the model directory: a Ray task with the workers' environment (and
    # a GPU when training had them), on this node when the output is a local folder.
    return call_on_worker(
        finalize_run,
        cfg.model_dump(mode="json"),
        run.checkpoint,
        run.run_path,
        run.use_gpu,
        started,
        num_gpus=1 if run.use_gpu else 0,
        runtime_env=worker_env(),
        near_driver=not storage.is_remote(cfg.out),
    )


def resolve_parent(cfg: TrainConfig) -> tuple[TrainConfig, ModelCard | None]:
    """For fine-tuning (``cfg.init_from``): the parent's weights (verified by digest),
    architecture, input size and flip TTA in the config, and the parent's card."""
    if cfg.init_from is None:
        return cfg, None
    parent = read_card(cfg.init_from)
    check_card(parent.preprocessing)
    inherited = {
        "backbone": parent.backbone,
        "head": parent.head,
        "input_size": parent.preprocessing.input_size,
        "tta_hflip": parent.tta_hflip,
        "contrast": contrast_method(parent.preprocessing.contrast),
        "weights": storage.join(cfg.init_from, WEIGHTS_NAME),
        "weights_sha256": parent.weights_sha256,
    }
    return TrainConfig.model_validate({**cfg.model_dump(mode="json"), **inherited}), parent


def lineage(parent: ModelCard) -> list[dict[str, Any]]:
    """The card's ``lineage`` for a model fine-tuned from ``parent``: nearest first."""
    entry = {
        "model_version": parent.model_version,
        "scoring_version": parent.scoring_version,
        "backbone": parent.backbone,
        "training_data_hash": parent.training_data_hash,
        "created_at": parent.created_at,
    }
    return [entry, *parent.lineage]


def training_environment(cfg: TrainConfig) -> dict[str, Any]:
    """What the weights depend on besides the data, the config and the code: library
    versions, the workers' torch threads (a different count sums in another order) and the
    CPU's vector extensions (oneDNN picks its kernels by them)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "torch": torch.__version__,
        **{n: installed(n) for n in ("torchvision", "timm", "kornia", "numpy", "pillow", "ray")},
        "torch_threads": cfg.torch_threads or threads_per_worker(cfg.workers),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": _cpu_model() or platform.machine(),
    }


def _cpu_model() -> str | None:
    """The CPU's model name (Linux), e.g. ``AMD EPYC``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def finalize_run(
    cfg_dump: dict[str, Any], checkpoint: Any, run_path: str, use_gpu: bool, started: float
) -> TrainResult:
    """Best-epoch weights from the final checkpoint → val/test reports → ``<out>/model``."""
    import torch

    from ..models import build_model

    cfg = TrainConfig.model_validate(cfg_dump)
    torch.set_num_threads(cfg.torch_threads or threads_per_worker(1))
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    with checkpoint_dir(checkpoint) as d:
        state, best_weights = load_checkpoint(d)
    model = build_model(cfg.backbone, len(CLASSES), None, head=cfg.head)
    model.load_state_dict(best_weights)
    model.eval()
    rows = load_rows(cfg.data, cfg.augment_with)
    history = list(state["history"])
    best = dict(state["best"])
    counts = rows.groupby(["split", "label"]).size()
    unfitted = ModelCard.for_model(
        model,
        cfg.input_size,
        shorter_side(rows),
        contrast=cfg.contrast,
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
            "environment": training_environment(cfg),
            "history": history,
        },
        training_config=cfg.model_dump(mode="json"),
        lineage=lineage(read_card(cfg.init_from)) if cfg.init_from else [],
    )
    # Calibration on val, the input gate on train and val (its view check with --views), the
    # CAM scale on val; then val and test through the Predictor that ships (calibrated,
    # gated), as the nightly job and the endpoint run it.
    fitted = fit_outputs(
        model,
        unfitted,
        rows,
        device=device,
        batch_size=cfg.eval_batch_size,
        view_rows=load_view_rows(cfg.views) if cfg.views else None,
    )
    predictor = fitted.predictor(model, device)
    reports = evaluate_val_test(
        predictor, rows, batch_size=cfg.eval_batch_size, held_out=held_out_sources(cfg.data)
    )
    model_uri = storage.join(cfg.out, "model")
    card = save_model_dir(
        model,
        fitted.card,
        model_uri,
        reports,
        gate_stats=fitted.gate_stats,
        view_stats=fitted.view_stats,
        reliability_png=fitted.reliability,
    )
    return TrainResult(
        model_uri=model_uri,
        model_version=card.model_version,
        run_path=run_path,
        best_epoch=int(best["epoch"]),
        reports={s: r.to_json() for s, r in reports.items()},
        history=history,
        wall_s=time.time() - started,
    )
