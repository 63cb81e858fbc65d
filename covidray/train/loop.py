"""The per-worker training function that Ray Train's TorchTrainer runs on every worker.

Per epoch: balanced sampling from the worker's decode-once cache, kornia augmentation on the
batch's device, AdamW with warmup + cosine schedule, label-smoothed cross-entropy (channels_last;
autocast on CUDA only), then validation (sharded, gathered, identical on every rank) and
``ray.train.report`` with a checkpoint from rank 0. A checkpoint holds the latest model,
optimizer, scheduler and scaler state, the epoch, the history and the best-so-far weights
(``best.safetensors``), so a restarted worker group resumes at checkpoint epoch + 1.

The pieces (``load_worker_data``, ``build_training``, ``train_one_epoch``) also run without
Ray: bench/train.py times an epoch of them in a plain loop against a Ray Train worker.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..augment import build_augmentation
from ..codec import u8_to_unit_tensor
from ..dataset import load_images, load_rows, shard_indices
from ..evaluation.metrics import evaluate_predictions
from ..labels import CLASSES
from ..models import build_model
from ..predict import predict_probs
from ..runtime.threads import threads_per_worker
from ..runtime.train import (
    checkpoint_dir,
    prepare_model,
    rank_and_world_size,
    report_with_checkpoint,
    restored_checkpoint,
    train_device,
)
from .config import TrainConfig
from .data import EpochSampler, sample_weights
from .robust import Objective, SourceCells, build_objective

STATE_NAME = "state.pt"
BEST_NAME = "best.safetensors"

# Called before every optimizer step as hook(epoch=..., step=..., rank=...); for fault drills.
StepHook = Callable[..., None]


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``s``: linear warmup, then cosine/constant."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    total = max(1, cfg.epochs * steps_per_epoch)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; no weight decay on biases and normalization parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adam_step(optimizer: torch.optim.Optimizer) -> int:
    """Steps taken so far, from the optimizer's own state (0 before the first step)."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(float(state["step"]))
    return 0


def _distributed(world: int) -> bool:
    return world > 1 and dist.is_available() and dist.is_initialized()


def gather_rows(local: torch.Tensor, n_total: int, world: int, rank: int) -> torch.Tensor:
    """Rows dealt ``[rank::world]`` to each worker, gathered back in their original order."""
    if not _distributed(world):
        return local
    per = math.ceil(n_total / world)
    padded = torch.zeros((per, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.empty((n_total, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        count = len(range(r, n_total, world))
        out[r::world] = part[:count].cpu()
    return out


def average_gradients(module: nn.Module) -> None:
    """Average ``module``'s gradients over the workers (for parameters DDP does not wrap)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def all_reduce_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _distributed(world):
        dist.all_reduce(t)
    return t.cpu().tolist()


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _save_checkpoint(directory: str, state: dict[str, Any], best: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    torch.save(state, os.path.join(directory, STATE_NAME))
    save_file({k: v.contiguous() for k, v in best.items()}, os.path.join(directory, BEST_NAME))


def load_checkpoint(directory: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(state, best_weights)`` of a training checkpoint directory (no arbitrary unpickling)."""
    from safetensors.torch import load_file

    state = torch.load(os.path.join(directory, STATE_NAME), map_location="cpu", weights_only=True)
    return state, load_file(os.path.join(directory, BEST_NAME))


class WorkerData(NamedTuple):
    """One worker's decode-once training shard, its batch sampler and its validation shard."""

    train_x: torch.Tensor  # N x 1 x S x S uint8
    train_y: torch.Tensor  # N, long
    sampler: EpochSampler
    val_x: torch.Tensor  # this rank's rows [rank::world] of val
    val_y: np.ndarray  # all val labels (predictions are gathered)
    train_s: torch.Tensor  # N, long: source index into cells.sources
    cells: SourceCells  # the whole train set's sources by class (group DRO, adversary)


def load_worker_data(cfg: TrainConfig, rank: int, world: int) -> WorkerData:
    """Read the manifest and decode this worker's train and val shards once."""
    rows = load_rows(cfg.data, cfg.augment_with)
    train_rows = rows[rows["split"] == "train"].reset_index(drop=True)
    val_rows = rows[rows["split"] == "val"].reset_index(drop=True)
    if train_rows.empty or val_rows.empty:
        raise ValueError(f"{cfg.data}: need labelled train and val rows")
    weights = sample_weights(
        train_rows["y"].to_numpy(),
        train_rows["source"].to_numpy(),
        cfg.balance,
        cfg.source_balance_power,
    )
    shard = shard_indices(len(train_rows), rank, world, cfg.seed)
    uris = [train_rows["uri"][i] for i in shard]
    train_x = load_images(uris, cfg.input_size, contrast=cfg.contrast)
    train_y = torch.as_tensor(train_rows["y"].to_numpy()[shard], dtype=torch.long)
    sampler = EpochSampler(weights[shard], len(train_rows), world, cfg.batch_size, cfg.seed)
    val_uris = list(val_rows["uri"])[rank::world]
    val_x = load_images(val_uris, cfg.input_size, contrast=cfg.contrast)
    cells = SourceCells.of(train_rows["y"].to_numpy(), list(train_rows["source"]), len(CLASSES))
    train_s = cells.index([train_rows["source"][i] for i in shard])
    return WorkerData(train_x, train_y, sampler, val_x, val_rows["y"].to_numpy(), train_s, cells)


class TrainParts(NamedTuple):
    """What one optimizer step needs besides the data (see :func:`build_training`)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype
    augment: nn.Module
    objective: Objective  # the loss (covidray.train.robust); its parameters are optimized too


def build_training(
    cfg: TrainConfig,
    steps_per_epoch: int,
    device: torch.device,
    cells: SourceCells | None = None,
) -> TrainParts:
    """Model (seeded by ``cfg.seed``, channels_last, still on the CPU), AdamW with the
    warmup + cosine schedule, the grad scaler (fp16 autocast only), the augmentation on
    ``device`` and the label-smoothed loss with the recipe's options (mixup/cutmix, group DRO
    and the source adversary: these need the train set's ``cells``)."""
    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    model = build_model(
        cfg.backbone,
        len(CLASSES),
        cfg.weights,
        head=cfg.head,
        freeze=cfg.freeze,
        weights_sha256=cfg.weights_sha256,
    )
    # channels_last on CPUs too: oneDNN's convolutions are much faster a step (README).
    model = model.to(memory_format=torch.channels_last)
    objective = build_objective(cfg, model.num_features, cells).to(device)
    groups = param_groups(model, cfg.weight_decay)
    if any(True for _ in objective.parameters()):
        groups.append({"params": list(objective.parameters()), "weight_decay": cfg.weight_decay})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)
    augment = build_augmentation(cfg.augment, acquisition=cfg.acquisition_augment).to(device)
    return TrainParts(model, optimizer, scheduler, scaler, amp_dtype, augment, objective)


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of the ``updates``-th EMA update (0-based): ``min(decay, (1 + n) / (10 + n))``.

    The warm-up keeps a short run's average from being dominated by the initial weights
    (with a fixed 0.99, 90 steps would still weigh them 40 %)."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def build_ema(model: nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of ``model``'s parameters and buffers (BatchNorm
    statistics included), updated after every optimizer step with :func:`ema_decay_at`;
    None when ``decay`` is None."""
    if decay is None:
        return None

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: Any) -> None:
        weight = 1.0 - ema_decay_at(decay, int(n))
        for a, c in zip(averaged, current, strict=True):
            if a.is_floating_point():
                a.lerp_(c, weight)
            else:  # e.g. BatchNorm's num_batches_tracked
                a.copy_(c)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of torch's RNG (augmentation, dropout) for one epoch of one worker."""
    return seed * 7919 + epoch * 131 + rank


def train_one_epoch(
    parts: TrainParts,
    batches: Iterable[torch.Tensor],
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    device: torch.device,
    *,
    model: nn.Module | None = None,
    hook: StepHook | None = None,
    ema: AveragedModel | None = None,
    epoch: int = 0,
    rank: int = 0,
    train_s: torch.Tensor | None = None,
) -> tuple[float, int]:
    """One pass over ``batches`` (index tensors into ``train_x``/``train_y``) with the
    optimizer, schedule, loss and augmentation of ``parts``: augmentation on ``device``,
    channels_last, autocast on CUDA only, one optimizer and scheduler step per batch, then
    an update of ``ema`` when given. ``model`` overrides ``parts.model`` (e.g. its DDP
    wrapper). ``train_s``: the rows' source indices, needed by group DRO and the source
    adversary. Returns ``(sum of per-batch losses × batch size, samples seen)``; the sum is
    read back from the device, so the call returns only when the epoch's work is done."""
    model = parts.model if model is None else model
    optimizer, scheduler, scaler = parts.optimizer, parts.scheduler, parts.scaler
    augment, objective, amp_dtype = parts.augment, parts.objective, parts.amp_dtype
    if objective.needs_sources and train_s is None:
        raise ValueError("group DRO and the source adversary need train_s")
    objective.train()
    cuda = device.type == "cuda"
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for step, idx in enumerate(batches):
        if hook is not None:
            hook(epoch=epoch, step=step, rank=rank)
        x = u8_to_unit_tensor(train_x[idx].to(device, non_blocking=True))
        y = train_y[idx].to(device, non_blocking=True)
        s = None if train_s is None else train_s[idx].to(device, non_blocking=True)
        with torch.no_grad():
            x, targets = objective.mixed(augment(x), y, s)
        x = x.contiguous(memory_format=torch.channels_last)
        with objective.features_of(model) as features:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=cuda):
                logits = model(x)
        loss = objective(logits.float(), targets, features[0] if features else None)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        average_gradients(objective)  # DDP averages the model's only
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(getattr(model, "module", model))
        loss_sum += loss.detach().double() * len(y)
        seen += len(y)
    return float(loss_sum), seen


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``{"cfg": TrainConfig dump, "step_hook": ...}``."""
    cfg = TrainConfig.model_validate(config["cfg"])
    hook: StepHook | None = config.get("step_hook")
    rank, world = rank_and_world_size()
    torch.set_num_threads(cfg.torch_threads or threads_per_worker(cfg.workers))
    device = train_device()
    cuda = device.type == "cuda"

    # --- data: this worker's train shard and val shard, decoded once -----------------------
    t0 = time.perf_counter()
    data = load_worker_data(cfg, rank, world)
    train_x, train_y, sampler, val_x, val_y = data[:5]
    load_s = time.perf_counter() - t0

    # --- model, optimizer, schedule -------------------------------------------------------
    parts = build_training(cfg, sampler.steps, device, data.cells)
    model, optimizer, scheduler = parts.model, parts.optimizer, parts.scheduler

    model.to(device)  # before the optimizer state is restored, so it lands on the device
    ema = build_ema(model, cfg.ema_decay)
    start_epoch, history = 0, []
    best: dict[str, Any] = {"epoch": -1, "macro_f1": -1.0, "val_loss": math.inf, "bad_epochs": 0}
    best_state: dict[str, torch.Tensor] = {}
    checkpoint = restored_checkpoint()
    if checkpoint is not None:
        with checkpoint_dir(checkpoint) as d:  # not as_directory(): see checkpoint_dir
            state, best_state = load_checkpoint(d)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        parts.scaler.load_state_dict(state["scaler"])
        if "objective" in state:
            parts.objective.load_state_dict(state["objective"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        best, history = dict(state["best"]), list(state["history"])
        start_epoch = int(state["epoch"]) + 1
        if state.get("stopped"):
            start_epoch = cfg.epochs
    steps_at_start = adam_step(optimizer)

    model = prepare_model(model)
    inner: nn.Module = getattr(model, "module", model)
    evaluated: nn.Module = ema.module if ema is not None else inner  # validated and shipped

    for epoch in range(start_epoch, cfg.epochs):
        t_epoch, cpu_epoch = time.perf_counter(), time.process_time()
        torch.manual_seed(epoch_seed(cfg.seed, epoch, rank))
        t_train, cpu_train = time.perf_counter(), time.process_time()
        loss_sum, seen = train_one_epoch(
            parts,
            sampler.batches(epoch, rank),
            train_x,
            train_y,
            device,
            model=model,
            hook=hook,
            ema=ema,
            epoch=epoch,
            rank=rank,
            train_s=data.train_s,
        )
        train_s, train_cpu_s = time.perf_counter() - t_train, time.process_time() - cpu_train
        train_loss_sum, train_n = all_reduce_sum([loss_sum, seen], device, world)

        # --- validation: every rank ends up with the same full-set metrics ---------------
        local = predict_probs(
            evaluated,
            val_x,
            batch_size=cfg.eval_batch_size,
            tta_hflip=cfg.tta_hflip,
            device=device,
            autocast=cuda,
        )
        probs = gather_rows(torch.from_numpy(local).to(device), len(val_y), world, rank).numpy()
        probs = probs / probs.sum(axis=1, keepdims=True)
        report = evaluate_predictions(probs, val_y)
        val_loss = float(-np.log(np.clip(probs[np.arange(len(val_y)), val_y], 1e-12, 1)).mean())
        improved = report.macro_f1 > best["macro_f1"] + 1e-9 or (
            abs(report.macro_f1 - best["macro_f1"]) <= 1e-9 and val_loss < best["val_loss"]
        )
        if improved:
            best = {"epoch": epoch, "macro_f1": report.macro_f1, "val_loss": val_loss}
            best["bad_epochs"] = 0
            best_state = _cpu_state(evaluated)
        else:
            best["bad_epochs"] += 1
        stop = (
            cfg.early_stopping_patience is not None
            and best["bad_epochs"] >= cfg.early_stopping_patience
        )
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss_sum / max(1.0, train_n),
            "val_loss": val_loss,
            "val_macro_f1": report.macro_f1,
            "val_accuracy": report.accuracy,
            "val_covid_recall": report.covid_recall,
            "lr": scheduler.get_last_lr()[0],
            "best_epoch": best["epoch"],
            "best_val_macro_f1": best["macro_f1"],
            "start_epoch": start_epoch,
            "resumed": checkpoint is not None,
            "adam_step_at_start": steps_at_start,
            "adam_step": adam_step(optimizer),
            "epoch_s": time.perf_counter() - t_epoch,
            "epoch_cpu_s": time.process_time() - cpu_epoch,  # vs epoch_s: CPU contention
            "train_s": train_s,  # the optimizer steps alone (epoch_s less validation etc.)
            "train_cpu_s": train_cpu_s,
            "data_load_s": load_s,
            "stopped_early": stop,
        }
        history.append(metrics)
        save = None
        if rank == 0:
            state = {
                "model": _cpu_state(inner),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": parts.scaler.state_dict(),
                "objective": _cpu_state(parts.objective),
                **({"ema": ema.state_dict()} if ema is not None else {}),
                "epoch": epoch,
                "best": best,
                "history": history,
                "stopped": stop,
            }
            save = partial(_save_checkpoint, state=state, best=best_state)
        report_with_checkpoint(metrics, save)
        if stop:
            break
