"""CycleGAN training on Ray Train (``TorchTrainer``), the same way covidray.train runs.

Every worker holds its shard of both domains (decoded once), the four networks wrapped by
``prepare_model`` (DDP when there are several workers; GPU and autocast when the cluster has
GPUs) and its own image pools. Per epoch rank 0 writes a sample grid
``<out>/samples/epoch_XXX.png`` (rows: A, A→B, A→B→A; XXX counts from 1) and a checkpoint
(networks, optimizers, schedulers, scalers, pools, epoch, history) to
``<out>/ray/<run name>``; a restarted worker group, or a new run with the same name and out,
resumes at checkpoint epoch + 1. The final A→B generator goes to ``<out>/generator.safetensors``
and ``<out>/generator.json``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from functools import partial
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from .. import storage
from ..modeldir import GeneratorCard, save_generator
from ..runtime.threads import threads_per_worker
from ..runtime.train import (
    EpochCallback,
    checkpoint_dir,
    fit_on_ray,
    prepare_model,
    rank_and_world_size,
    report_with_checkpoint,
    restored_checkpoint,
    train_device,
)
from .config import GanConfig
from .data import DomainCache, UnpairedSampler, load_domains, steps_per_epoch, worker_shard
from .model import LOSSES, CycleGAN, sample_grid
from .networks import ResnetGenerator, count_parameters

log = logging.getLogger(__name__)

STATE_NAME = "gan_state.pt"


def _all_reduce_mean(values: list[float], device: torch.device, world: int) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return (t / world).cpu().tolist()


def load_state(directory: str) -> dict[str, Any]:
    """The state of a GAN checkpoint directory (tensors and plain types only)."""
    return torch.load(os.path.join(directory, STATE_NAME), map_location="cpu", weights_only=True)


def _save_state(state: dict[str, Any], folder: str) -> None:
    torch.save(state, os.path.join(folder, STATE_NAME))


def gan_train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``{"cfg": GanConfig dump}``."""
    cfg = GanConfig.model_validate(config["cfg"])
    rank, world = rank_and_world_size()
    torch.set_num_threads(cfg.torch_threads or threads_per_worker(cfg.workers))
    device = train_device()

    t0 = time.perf_counter()
    rows_a, rows_b = load_domains(
        cfg.data, (cfg.domain_a, cfg.filter_a), (cfg.domain_b, cfg.filter_b)
    )
    shard_a = worker_shard(len(rows_a), rank, world, cfg.seed)
    shard_b = worker_shard(len(rows_b), rank, world, cfg.seed + 1)
    cache_a = DomainCache([rows_a["uri"][i] for i in shard_a], cfg.size, cfg.jitter)
    cache_b = DomainCache([rows_b["uri"][i] for i in shard_b], cfg.size, cfg.jitter)
    steps = steps_per_epoch(
        len(rows_a), len(rows_b), world, cfg.batch_size, cfg.epochs, cfg.iterations
    )
    sampler = UnpairedSampler(len(cache_a), len(cache_b), cfg.batch_size, steps, cfg.seed)
    fixed = None
    if rank == 0:  # the same domain-A images in every epoch's sample grid
        k = min(cfg.sample_count, len(rows_a))
        fixed = DomainCache(list(rows_a["uri"][:k]), cfg.size).batch(torch.arange(k), None)
    load_s = time.perf_counter() - t0

    gan = CycleGAN(cfg, device, total_steps=steps * cfg.epochs, rank=rank)
    start_epoch, history = 0, []
    checkpoint = restored_checkpoint()
    if checkpoint is not None:
        with checkpoint_dir(checkpoint) as d:  # not as_directory(): see checkpoint_dir
            state = load_state(d)
        gan.load_state_dict(state)
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
    step_at_start = gan.step
    gan.wrap(prepare_model)
    for net in gan.nets.values():
        net.train()

    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        g = sampler.generator(epoch, rank)
        sums = torch.zeros(len(LOSSES), dtype=torch.float64, device=device)
        for i, (ia, ib) in enumerate(sampler.batches(epoch, rank, g)):
            real_a = cache_a.batch(ia, g, cfg.hflip).to(device, non_blocking=True)
            real_b = cache_b.batch(ib, g, cfg.hflip).to(device, non_blocking=True)
            losses = gan.train_step(real_a, real_b)
            sums += torch.stack([losses[k] for k in LOSSES]).double()
            if rank == 0 and cfg.log_every and (i + 1) % cfg.log_every == 0:
                rate = (time.perf_counter() - t_epoch) / (i + 1)
                print(
                    f"[gan] epoch {epoch + 1} step {i + 1}/{steps}  {rate:.2f} s/iter  "
                    f"G {float(losses['loss_g']):.3f}  D_A {float(losses['loss_d_a']):.3f}  "
                    f"D_B {float(losses['loss_d_b']):.3f}",
                    flush=True,
                )
        train_s = time.perf_counter() - t_epoch
        means = _all_reduce_mean((sums / steps).cpu().tolist(), device, world)

        sample_uri = None
        if rank == 0 and fixed is not None:
            fake, rec = gan.translate(fixed)
            sample_uri = storage.join(cfg.out, "samples", f"epoch_{epoch + 1:03d}.png")
            storage.write_bytes(sample_uri, sample_grid([fixed, fake, rec]))
        metrics: dict[str, Any] = {
            "epoch": epoch,
            **dict(zip(LOSSES, means, strict=True)),
            "lr": gan.sched_g.get_last_lr()[0],
            "step": gan.step,
            "steps_per_epoch": steps,
            "total_steps": steps * cfg.epochs,
            "start_epoch": start_epoch,
            "resumed": checkpoint is not None,
            "step_at_start": step_at_start,
            "epoch_s": time.perf_counter() - t_epoch,
            "s_per_iter": train_s / steps,
            "data_load_s": load_s,
            "n_a": len(rows_a),
            "n_b": len(rows_b),
            "world_size": world,
            "sample_uri": sample_uri,
        }
        history.append(metrics)

        save = None
        if rank == 0:
            state = gan.state_dict(with_pools=cfg.checkpoint_pool)
            state.update(epoch=epoch, history=history)
            save = partial(_save_state, state)
        report_with_checkpoint(metrics, save, "covidray-gan-ckpt-")


# ------------------------------------------------------------------------------ driver side


class GanTrainResult(BaseModel):
    """What a finished GAN run produced."""

    generator_uri: str  # folder with generator.safetensors and generator.json
    generator_version: str
    run_path: str
    samples_uri: str
    epochs_run: int
    total_steps: int
    s_per_iter: float  # median over the epochs run
    history: list[dict[str, Any]]
    wall_s: float


def _log_epoch(metrics: dict[str, Any]) -> None:
    log.info("gan epoch report: %s", metrics)


def run_gan_training(cfg: GanConfig, *, on_epoch: EpochCallback | None = None) -> GanTrainResult:
    """Train the CycleGAN on Ray Train and save the A→B generator to ``cfg.out``.

    ``on_epoch(metrics)`` is called on the driver after every epoch (default: logged), and
    with ``{"event": "failure", ...}`` when a worker group fails.
    """
    t0 = time.perf_counter()
    rows_a, rows_b = load_domains(
        cfg.data, (cfg.domain_a, cfg.filter_a), (cfg.domain_b, cfg.filter_b)
    )
    run = fit_on_ray(
        gan_train_loop_per_worker,
        {"cfg": cfg.model_dump(mode="json")},
        cfg,
        kind="gan",
        on_epoch=on_epoch or _log_epoch,
    )
    with checkpoint_dir(run.checkpoint) as d:
        state = load_state(d)
    history = list(state["history"])
    generator = ResnetGenerator(1, 1, cfg.ngf, cfg.n_blocks)
    generator.load_state_dict(state["g_ab"])
    rates = [h["s_per_iter"] for h in history]
    s_per_iter = float(np.median(rates)) if rates else math.nan
    run_path = run.run_path
    card = GeneratorCard(
        architecture=dict(generator.config),
        size=cfg.size,
        domain_a=cfg.domain_a,
        domain_b=cfg.domain_b,
        filter_a=cfg.filter_a.model_dump(mode="json"),
        filter_b=cfg.filter_b.model_dump(mode="json"),
        config=cfg.model_dump(mode="json"),
        training={
            "epochs_run": len(history),
            "steps": int(state["step"]),
            "n_a": len(rows_a),
            "n_b": len(rows_b),
            "workers": cfg.workers,
            "use_gpu": run.use_gpu,
            "parameters": count_parameters(generator),
            "s_per_iter": s_per_iter,
            "wall_s": time.perf_counter() - t0,
            "run_path": run_path,
            "history": history,
        },
    )
    card = save_generator(generator, card, cfg.out)
    return GanTrainResult(
        generator_uri=cfg.out,
        generator_version=card.generator_version,
        run_path=run_path,
        samples_uri=storage.join(cfg.out, "samples"),
        epochs_run=len(history),
        total_steps=int(state["step"]),
        s_per_iter=s_per_iter,
        history=history,
        wall_s=time.perf_counter() - t0,
    )
