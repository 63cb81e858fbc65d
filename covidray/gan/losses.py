"""CycleGAN objectives (LSGAN, cycle and identity L1) and the image history pool."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def lsgan_loss(scores: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss: mean of ``(score - 1)²`` for real targets, ``score²`` for fake."""
    scores = scores.float()
    return F.mse_loss(scores, torch.ones_like(scores) if real else torch.zeros_like(scores))


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(a.float(), b.float())


class ImagePool:
    """History of generated images (Shrivastava et al. 2017) that the discriminators train on.

    ``query(images)`` returns a batch of the same size. Until the pool holds ``size`` images,
    each image is stored and returned as is; afterwards, with probability 1/2 an image is
    returned as is, otherwise a random stored image is returned and replaced by it. A pool of
    size 0 returns its input. Draws come from the pool's own seeded generator.
    """

    def __init__(self, size: int = 50, seed: int = 0) -> None:
        self.size = size
        self.images: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.images)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand((), generator=self.generator) < 0.5:
                k = int(torch.randint(len(self.images), (), generator=self.generator))
                out.append(self.images[k].clone())
                self.images[k] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state_dict(self) -> dict[str, Any]:
        """Stored images (CPU, float16) and the generator state, for checkpoints."""
        stack = (
            torch.cat(self.images).to("cpu", torch.float16)
            if self.images
            else torch.zeros((0,), dtype=torch.float16)
        )
        return {"size": self.size, "images": stack, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        images = state["images"]
        self.images = (
            []
            if images.numel() == 0
            else [img.unsqueeze(0).to(device, torch.float32) for img in images][: self.size]
        )
        self.generator.set_state(state["rng"])
