"""Issue 13, item 12: BatchNorm folding covers the default model (timm's ``BatchNormAct2d``).

EfficientNet-Lite0 (``tf_efficientnet_lite0``) keeps its batch norms in timm's
``BatchNormAct2d`` (BN + dropout + activation), inside named block attributes rather than
``nn.Sequential`` pairs: folding must reach all 49 of them and leave the logits, probabilities
and Grad-CAM maps as they were.
"""

from __future__ import annotations

import numpy as np
import torch

from covidray.modeldir import ModelCard
from covidray.models import build_model
from covidray.predict import Predictor, fold_batchnorm

SIZE = 64


def lite0_with_statistics(seed: int = 1) -> torch.nn.Module:
    """Random weights with non-trivial running statistics, so that folding has work to do."""
    torch.manual_seed(seed)
    model = build_model("efficientnet_lite0", weights=None).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    for m in model.head.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.5)
    return model


def test_lite0_logits_equal_after_folding() -> None:
    model = lite0_with_statistics()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert n_bn == 49
    folded = lite0_with_statistics()
    assert fold_batchnorm(folded) == n_bn
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert fold_batchnorm(folded) == 0  # nothing left to fold
    x = torch.rand(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        a, b = model(x), folded(x)
    scale = float(a.abs().max())
    assert scale > 0.1
    assert float((a - b).abs().max()) <= 1e-4 * scale
    # The Grad-CAM target (features.bn2) is still there, by name: BN gone, ReLU6 kept.
    assert isinstance(folded.target_layer, torch.nn.ReLU6)


def test_lite0_predictor_results_unchanged() -> None:
    model = lite0_with_statistics(2)
    card = ModelCard.for_model(model, SIZE, model_version="lite0")
    on = Predictor(model, card, device="cpu", threads=1)
    off = Predictor(model, card, device="cpu", threads=1, fold_bn=False)
    assert on.folded == 49 and off.folded == 0
    x = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    ra, rb = on.predict(x), off.predict(x)
    np.testing.assert_allclose(ra.probs, rb.probs, atol=1e-5)
    assert np.abs(ra.cam_raw.astype(int) - rb.cam_raw.astype(int)).max() <= 1
    np.testing.assert_allclose(ra.cam_area, rb.cam_area, atol=0.02)
