"""Small untrained classifiers for tests: Lite0 with random weights and a scaled-up head, so
that its logits are far from uniform and its class maps are not flat."""

from __future__ import annotations

import torch

from covidray.models import build_model


def tiny_lite0(seed: int = 0, *, bias: bool = False) -> torch.nn.Module:
    """``efficientnet_lite0`` without pretrained weights, head weights ~ N(0, 0.5²) (and its
    biases too with ``bias``), in eval mode."""
    torch.manual_seed(seed)
    model = build_model("efficientnet_lite0", weights=None)
    for m in model.head.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.5)
            if bias:
                torch.nn.init.normal_(m.bias, std=0.5)
    return model.eval()


def save_tiny_model(uri: str, seed: int, size: int = 64) -> str:
    """A model directory of :func:`tiny_lite0` at ``size`` px; its model_version."""
    from covidray.modeldir import ModelCard, save_model_dir

    model = tiny_lite0(seed)
    return save_model_dir(model, ModelCard.for_model(model, size, size), uri).model_version


def png_bytes(seed: int, size: int = 64) -> bytes:
    """A gray ramp with noise, as PNG bytes: a decodable film-sized stand-in."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.5 * x + 0.3 * y + 0.2 * rng.random((size, size))
    buf = io.BytesIO()
    Image.fromarray(np.uint8(img * 255), "L").save(buf, "PNG")
    return buf.getvalue()
