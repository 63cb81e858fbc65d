"""Chest X-ray classifiers: VGG16, ResNet50, EfficientNet-B0 and EfficientNet-Lite0 backbones
with the paper's head, freezing policies, Grad-CAM target layers and weight loading."""

from __future__ import annotations

from .backbones import (
    BACKBONES,
    IMAGENET_MEAN_STD,
    SPECS,
    BackboneSpec,
    CxrClassifier,
    build_model,
    efficientnet_b0,
    efficientnet_lite0,
    get_spec,
    parse_freeze,
    resnet50,
    vgg16,
)
from .heads import HEADS, build_head
from .lite0 import (
    LITE0_MEAN_STD,
    LITE0_STAGE_REPEATS,
    lite0_state_dict,
    lite0_weights_path,
    rename_lite0_key,
    timm_lite0_imagenet,
)
from .weights import (
    OFFLINE_ENV,
    WeightsError,
    WeightsNotFoundError,
    WeightsUnavailableError,
    load_imagenet_state_dict,
    load_state_dict_uri,
    state_dict_from_bytes,
)

__all__ = [
    "BACKBONES",
    "HEADS",
    "IMAGENET_MEAN_STD",
    "LITE0_MEAN_STD",
    "LITE0_STAGE_REPEATS",
    "OFFLINE_ENV",
    "SPECS",
    "BackboneSpec",
    "CxrClassifier",
    "WeightsError",
    "WeightsNotFoundError",
    "WeightsUnavailableError",
    "build_head",
    "build_model",
    "efficientnet_b0",
    "efficientnet_lite0",
    "get_spec",
    "lite0_state_dict",
    "lite0_weights_path",
    "load_imagenet_state_dict",
    "load_state_dict_uri",
    "parse_freeze",
    "rename_lite0_key",
    "resnet50",
    "state_dict_from_bytes",
    "timm_lite0_imagenet",
    "vgg16",
]
