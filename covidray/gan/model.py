"""The CycleGAN (Zhu et al. 2017): four networks, their optimizers, schedules, scalers and
image pools, and one training step; plus the per-epoch sample grid. No Ray here: the Ray Train
loop (``covidray.gan.train``) and ``time_steps`` (``bench/gan_step.py``) drive it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..codec import FAST_PNG, encode_png, unit_to_u8
from .config import GanConfig
from .data import from_gan
from .losses import ImagePool, l1, lsgan_loss
from .networks import PatchDiscriminator, ResnetGenerator

NETS = ("g_ab", "g_ba", "d_a", "d_b")
LOSSES = ("loss_g", "loss_g_gan", "loss_cycle", "loss_identity", "loss_d_a", "loss_d_b")


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
        pix = unit_to_u8(from_gan(row)[:, 0].numpy())
        for c in range(k):
            y, x = pad + r * (size + pad), pad + c * (size + pad)
            grid[y : y + size, x : x + size] = pix[c]
    return encode_png(grid, compress_level=FAST_PNG)


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
