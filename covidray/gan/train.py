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

import itertools
import math
import os
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from .. import storage
from ..ingest import encode_png
from ..raycluster import checkpoint_dir, report_with_checkpoint
from .config import GanConfig
from .data import (
    DomainCache,
    UnpairedSampler,
    from_gan,
    load_domains,
    steps_per_epoch,
    worker_shard,
)
from .losses import ImagePool, l1, lsgan_loss
from .networks import (
    GeneratorCard,
    PatchDiscriminator,
    ResnetGenerator,
    count_parameters,
    save_generator,
)

STATE_NAME = "gan_state.pt"
NETS = ("g_ab", "g_ba", "d_a", "d_b")
LOSSES = ("loss_g", "loss_g_gan", "loss_cycle", "loss_identity", "loss_d_a", "loss_d_b")

EpochCallback = Callable[[dict[str, Any]], None]


def linear_decay(total_steps: int, decay_start: float) -> Callable[[int], float]:
    """lr multiplier at step ``s``: 1 for the first ``decay_start`` share, then linear to 0."""
    start = int(round(total_steps * decay_start))
    span = max(1, total_steps - start)

    def f(step: int) -> float:
        return 1.0 if step < start else max(0.0, (total_steps - step) / span)

    return f


def _requires_grad(modules: Iterable[nn.Module], flag: bool) -> None:
    for m in modules:
        m.requires_grad_(flag)


def _inner(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


class CycleGAN:
    """The four networks, their optimizers, schedules, scalers and pools, and one train step."""

    def __init__(self, cfg: GanConfig, device: torch.device, total_steps: int, rank: int = 0):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.nets: dict[str, nn.Module] = {
            "g_ab": ResnetGenerator(1, 1, cfg.ngf, cfg.n_blocks),
            "g_ba": ResnetGenerator(1, 1, cfg.ngf, cfg.n_blocks),
            "d_a": PatchDiscriminator(1, cfg.ndf, cfg.d_layers),
            "d_b": PatchDiscriminator(1, cfg.ndf, cfg.d_layers),
        }
        for net in self.nets.values():
            net.to(device)
        betas = (cfg.beta1, cfg.beta2)
        g_params = itertools.chain(self.nets["g_ab"].parameters(), self.nets["g_ba"].parameters())
        d_params = itertools.chain(self.nets["d_a"].parameters(), self.nets["d_b"].parameters())
        self.opt_g = torch.optim.Adam(g_params, lr=cfg.lr, betas=betas)
        self.opt_d = torch.optim.Adam(d_params, lr=cfg.lr, betas=betas)
        decay = linear_decay(total_steps, cfg.decay_start)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, decay)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, decay)
        cuda = device.type == "cuda"
        self.amp = cuda and cfg.amp
        bf16 = cuda and torch.cuda.is_bf16_supported()
        self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        fp16 = self.amp and self.amp_dtype == torch.float16
        self.scaler_g = torch.amp.GradScaler("cuda", enabled=fp16)
        self.scaler_d = torch.amp.GradScaler("cuda", enabled=fp16)
        self.pool_a = ImagePool(cfg.pool_size, seed=cfg.seed * 31 + rank)
        self.pool_b = ImagePool(cfg.pool_size, seed=cfg.seed * 31 + rank + 7)
        self.step = 0

    def wrap(self, prepare: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap each network (``ray.train.torch.prepare_model``: device and DDP)."""
        self.nets = {k: prepare(v) for k, v in self.nets.items()}

    def inner(self, name: str) -> nn.Module:
        return _inner(self.nets[name])

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def train_step(self, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, torch.Tensor]:
        """One generator update, then one discriminator update; detached losses."""
        cfg, nets = self.cfg, self.nets
        lam, lam_idt = cfg.lambda_cycle, cfg.lambda_cycle * cfg.lambda_identity
        d_a, d_b = self.inner("d_a"), self.inner("d_b")  # no DDP sync in the G step
        _requires_grad((d_a, d_b), False)
        with self._autocast():
            fake_b = nets["g_ab"](real_a)
            fake_a = nets["g_ba"](real_b)
            rec_a = nets["g_ba"](fake_b)
            rec_b = nets["g_ab"](fake_a)
            gan = lsgan_loss(d_b(fake_b), True) + lsgan_loss(d_a(fake_a), True)
            if lam_idt > 0:
                idt = lam_idt * (
                    l1(nets["g_ab"](real_b), real_b) + l1(nets["g_ba"](real_a), real_a)
                )
            else:
                idt = torch.zeros((), device=self.device)
        cycle = lam * (l1(rec_a, real_a) + l1(rec_b, real_b))
        loss_g = gan + cycle + idt
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler_g.scale(loss_g).backward()
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        _requires_grad((d_a, d_b), True)

        pooled_a = self.pool_a.query(fake_a.detach().float())
        pooled_b = self.pool_b.query(fake_b.detach().float())
        with self._autocast():
            loss_d_a = 0.5 * (
                lsgan_loss(nets["d_a"](real_a), True) + lsgan_loss(nets["d_a"](pooled_a), False)
            )
            loss_d_b = 0.5 * (
                lsgan_loss(nets["d_b"](real_b), True) + lsgan_loss(nets["d_b"](pooled_b), False)
            )
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler_d.scale(loss_d_a + loss_d_b).backward()
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()
        self.sched_g.step()
        self.sched_d.step()
        self.step += 1
        values = (loss_g, gan, cycle, idt, loss_d_a, loss_d_b)
        return {k: v.detach().float() for k, v in zip(LOSSES, values, strict=True)}

    @torch.no_grad()
    def translate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A→B, A→B→A)`` of a batch of domain-A images in [-1, 1] (float32 on CPU)."""
        with self._autocast():
            fake = self.inner("g_ab")(x.to(self.device))
            rec = self.inner("g_ba")(fake)
        return fake.float().cpu(), rec.float().cpu()

    def state_dict(self, with_pools: bool) -> dict[str, Any]:
        state: dict[str, Any] = {
            k: {n: t.detach().cpu().clone() for n, t in self.inner(k).state_dict().items()}
            for k in NETS
        }
        state.update(
            opt_g=self.opt_g.state_dict(),
            opt_d=self.opt_d.state_dict(),
            sched_g=self.sched_g.state_dict(),
            sched_d=self.sched_d.state_dict(),
            scaler_g=self.scaler_g.state_dict(),
            scaler_d=self.scaler_d.state_dict(),
            step=self.step,
        )
        if with_pools:
            state.update(pool_a=self.pool_a.state_dict(), pool_b=self.pool_b.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore everything (call before :meth:`wrap`, after the networks are on device)."""
        for k in NETS:
            self.inner(k).load_state_dict(state[k])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        self.scaler_g.load_state_dict(state["scaler_g"])
        self.scaler_d.load_state_dict(state["scaler_d"])
        self.step = int(state["step"])
        if "pool_a" in state:
            self.pool_a.load_state_dict(state["pool_a"], self.device)
            self.pool_b.load_state_dict(state["pool_b"], self.device)


def sample_grid(rows: list[torch.Tensor], pad: int = 2) -> bytes:
    """PNG of image rows (each ``(k, 1, S, S)`` in [-1, 1]) on a black background."""
    k, size = rows[0].shape[0], rows[0].shape[-1]
    h, w = len(rows) * (size + pad) + pad, k * (size + pad) + pad
    grid = np.zeros((h, w), dtype=np.uint8)
    for r, row in enumerate(rows):
        pix = (from_gan(row)[:, 0].numpy() * 255.0).round().astype(np.uint8)
        for c in range(k):
            y, x = pad + r * (size + pad), pad + c * (size + pad)
            grid[y : y + size, x : x + size] = pix[c]
    return encode_png(grid)


def default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


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
    import ray.train
    import ray.train.torch

    cfg = GanConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.torch_threads or default_threads(cfg.workers))
    device = ray.train.torch.get_device()

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
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint_dir(checkpoint) as d:  # not as_directory(): see checkpoint_dir
            state = load_state(d)
        gan.load_state_dict(state)
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
    step_at_start = gan.step
    gan.wrap(ray.train.torch.prepare_model)
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


def epoch_line(m: dict[str, Any], epochs: int) -> str:
    """One human-readable line for an epoch's reported metrics."""
    resumed = " (resumed)" if m.get("resumed") and m["epoch"] == m["start_epoch"] else ""
    return (
        f"epoch {m['epoch'] + 1:>3}/{epochs}  G {m['loss_g']:.3f} (gan {m['loss_g_gan']:.3f} "
        f"cycle {m['loss_cycle']:.3f} idt {m['loss_identity']:.3f})  D_A {m['loss_d_a']:.3f}  "
        f"D_B {m['loss_d_b']:.3f}  lr {m['lr']:.2e}  step {m['step']}/{m['total_steps']}  "
        f"{m['s_per_iter']:.2f} s/iter  {m['epoch_s']:.0f} s{resumed}"
    )


def run_gan_training(cfg: GanConfig, *, on_epoch: EpochCallback | None = None) -> GanTrainResult:
    """Train the CycleGAN on Ray Train and save the A→B generator to ``cfg.out``.

    ``on_epoch(metrics)`` is called on the driver after every epoch (default: a line on
    stderr), and with ``{"event": "failure", ...}`` when a worker group fails.
    """
    from ..train.trainer import default_printer, fit_on_ray

    t0 = time.perf_counter()
    rows_a, rows_b = load_domains(
        cfg.data, (cfg.domain_a, cfg.filter_a), (cfg.domain_b, cfg.filter_b)
    )
    run = fit_on_ray(
        gan_train_loop_per_worker,
        {"cfg": cfg.model_dump(mode="json")},
        cfg,
        kind="gan",
        printer=on_epoch or default_printer(cfg.epochs, epoch_line),
    )
    with checkpoint_dir(run.result.checkpoint) as d:
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


def time_steps(cfg: GanConfig, steps: int = 3, warmup: int = 1) -> float:
    """Seconds per training step on this machine (random images, no Ray): for planning."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    gan = CycleGAN(cfg, device, total_steps=steps + warmup)
    shape = (cfg.batch_size, 1, cfg.size, cfg.size)
    x_a, x_b = torch.rand(shape, device=device) * 2 - 1, torch.rand(shape, device=device) * 2 - 1
    for _ in range(warmup):
        gan.train_step(x_a, x_b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        gan.train_step(x_a, x_b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps
