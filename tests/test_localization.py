"""Grad-CAM pointing game on synthetic phantoms: does the map point at the lesion?

A small CNN is trained briefly (plain PyTorch, seeded, one thread) on phantoms from
:mod:`covidray.synth` (covid = 0, pneumonia = bacterial + viral = 1, normal = 2). On held-out
phantoms, the peak of the Grad-CAM map for the *true* class must fall inside the lesion mask
for at least 80% of the covid and 80% of the pneumonia images, well above chance (the mean
share of the image the mask covers). The same measurement on the untrained network must fall
short of the bar, so the test can fail.

Why a small VGG-style CNN rather than a fine-tuned project backbone: the masks are tight (a
few percent of the image) and the pointing game needs a map finer than the lesions. The
backbones' Grad-CAM layers have stride 32 (4 x 4 at 128 px, 7 x 7 at 224 px). Briefly
fine-tuned EfficientNet-Lite0 (ImageNet weights, 160 px, 3-6 epochs) classified the phantoms
well, but its maps peaked on the mediastinum at its default layer ``bn2`` (5 x 5: at most 10%
of the covid peaks inside the masks) and, at the stride-16 ``blocks.4`` (10 x 10), put 5-70%
of the covid and 12-100% of the pneumonia peaks inside the masks depending on the recipe.
This network keeps a stride-8 map (16 x 16 at 128 px) with a small receptive field (22 px).
It downsamples with 2 x 2 max pooling after stride-1 convolutions, so each map cell is
centred on the pixels it summarizes (stride-2 3 x 3 convolutions shift the map by 3.5 px at
stride 8, which matters against tight masks). Equivalence of the Grad-CAM maps on the project
backbones is tested in ``test_gradcam.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covidray.explain import GradCAM, cam_summary
from covidray.synth import render_phantom

SIZE = 128
LABELS = {"covid": 0, "bacterial": 1, "viral": 1, "normal": 2}
N_TRAIN = 50  # per kind: 50 covid, 100 pneumonia (50 bacterial + 50 viral), 50 normal
N_TEST = 20  # per lesion kind: 20 covid, 40 pneumonia
EPOCHS = 12
DILATE_PX = 1  # the synth masks are tight: grant the peak one pixel (3 x 3 dilation)
BAR = 0.80


class SmallCxrNet(nn.Module):
    """conv3x3-BN-ReLU + maxpool x 3 (stride 8), two 1 x 1 conv-BN-ReLU layers (the Grad-CAM
    target), global average pooling, linear classifier. Input ``B x 1 x H x W`` in [0, 1]."""

    def __init__(self, num_classes: int = 3, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, k: int) -> list[nn.Module]:
            conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
            return [conv, nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.features = nn.Sequential(
            *block(1, w // 2, 3),
            nn.MaxPool2d(2),
            *block(w // 2, w, 3),
            nn.MaxPool2d(2),
            *block(w, 2 * w, 3),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w, 1),
            *block(4 * w, 4 * w, 1),
        )
        self.head = nn.Linear(4 * w, num_classes)

    @property
    def target_layer(self) -> nn.Module:
        return self.features[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - 0.5) / 0.25).mean(dim=(2, 3)))


def _phantoms(seed: int, n: int, kinds: tuple[str, ...]):
    rng = np.random.default_rng(seed)
    images, masks, kind_of = [], [], []
    for _ in range(n):
        for kind in kinds:
            image, mask = render_phantom(kind, rng, SIZE)
            images.append(image)
            masks.append(mask)
            kind_of.append(kind)
    x = torch.from_numpy(np.stack(images))[:, None].float() / 255.0
    y = torch.tensor([LABELS[k] for k in kind_of])
    return x, y, np.stack(masks), np.array(kind_of)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    batch = 16
    steps = EPOCHS * -(-len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.2)
    model.train()
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def _pointing_game(model: nn.Module, x, y, masks, kinds) -> dict[str, float]:
    """Hit rate (peak of the true class's map inside the dilated mask) and chance (mean mask
    share) for covid and pneumonia, plus the classification accuracy."""
    res = GradCAM(model)(x, class_idx=y)
    summary = cam_summary(res.cam)
    h, w = res.cam.shape[-2:]
    py = (summary["peak_y"] * h).long().numpy()  # back to pixel indices (centres)
    px = (summary["peak_x"] * w).long().numpy()
    k = 2 * DILATE_PX + 1
    mask_t = torch.from_numpy(masks)[:, None].float()
    dilated = F.max_pool2d(mask_t, k, stride=1, padding=DILATE_PX)[:, 0].bool().numpy()
    hit = dilated[np.arange(len(x)), py, px]
    out = {"accuracy": float((res.pred == y).float().mean())}
    for name, sel in (("covid", kinds == "covid"), ("pneumonia", kinds != "covid")):
        out[f"{name}_hit"] = float(hit[sel].mean())
        out[f"{name}_chance"] = float(dilated[sel].mean())
    return out


@pytest.fixture(scope="module")
def phantom_sets():
    torch.set_num_threads(1)
    train = _phantoms(0, N_TRAIN, ("covid", "bacterial", "viral", "normal"))
    test = _phantoms(1, N_TEST, ("covid", "bacterial", "viral"))
    return train, test


def test_gradcam_points_at_lesions_after_training(phantom_sets) -> None:
    (x_tr, y_tr, _, _), (x_te, y_te, m_te, k_te) = phantom_sets
    torch.manual_seed(0)
    model = SmallCxrNet()

    untrained = _pointing_game(model.eval(), x_te, y_te, m_te, k_te)
    # The control: without training the map does not find the lesions, so the bar can fail.
    assert untrained["covid_hit"] < BAR, untrained
    assert untrained["pneumonia_hit"] < BAR, untrained

    _train(model, x_tr, y_tr)
    trained = _pointing_game(model, x_te, y_te, m_te, k_te)
    assert trained["accuracy"] >= 0.9, trained
    for name in ("covid", "pneumonia"):
        hit, chance = trained[f"{name}_hit"], trained[f"{name}_chance"]
        assert hit >= BAR, (name, trained)
        assert hit >= chance + 0.4 and hit >= 3 * chance, (name, trained)
        assert hit > untrained[f"{name}_hit"] + 0.4, (name, trained, untrained)
