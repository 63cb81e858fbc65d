"""CycleGAN networks (Zhu et al. 2017): ResNet generator and 70×70 PatchGAN discriminator.

Both follow the reference implementation (junyanz/pytorch-CycleGAN-and-pix2pix): reflection
padding, instance norm without affine parameters (so convolutions keep their biases), N(0, 0.02)
initialization; one gray channel in and out, images in [-1, 1].
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Norm = Literal["instance", "none"]


def _norm(kind: Norm, channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels) if kind == "instance" else nn.Identity()


def init_weights(module: nn.Module, gain: float = 0.02) -> nn.Module:
    """The reference ``normal`` init: conv weights N(0, gain), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


class ResnetBlock(nn.Module):
    """``x + (pad, conv3, norm, ReLU, pad, conv3, norm)(x)``."""

    def __init__(self, channels: int, norm: Norm = "instance") -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            _norm(norm, channels),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            _norm(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """c7s1-ngf, d2ngf, d4ngf, ``n_blocks`` × R4ngf, u2ngf, ungf, c7s1-out, tanh.

    The output has the input's size whenever that is a multiple of 4.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        ngf: int = 64,
        n_blocks: int = 9,
        norm: Norm = "instance",
    ) -> None:
        super().__init__()
        self.config = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "ngf": ngf,
            "n_blocks": n_blocks,
            "norm": norm,
        }
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, 7),
            _norm(norm, ngf),
            nn.ReLU(True),
        ]
        ch = ngf
        for _ in range(2):  # downsample
            layers += [nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1), _norm(norm, ch * 2)]
            layers.append(nn.ReLU(True))
            ch *= 2
        layers += [ResnetBlock(ch, norm) for _ in range(n_blocks)]
        for _ in range(2):  # upsample
            layers.append(nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1))
            layers += [_norm(norm, ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN: C64-C128-C256-C512 (4×4 convs), one score per 70×70 patch (``n_layers=3``).

    No norm on the first layer, LeakyReLU 0.2; the output map is ``(B, 1, h, w)`` of raw scores
    (LSGAN compares them with 1 and 0 by mean squared error).
    """

    def __init__(
        self, in_channels: int = 1, ndf: int = 64, n_layers: int = 3, norm: Norm = "instance"
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1),
                _norm(norm, ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def receptive_field(module: nn.Module) -> int:
    """Receptive field (pixels) of one output unit of a plain conv stack such as the PatchGAN."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    field = 1
    for conv in reversed(convs):
        field = (field - 1) * conv.stride[0] + conv.kernel_size[0]
    return field


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
