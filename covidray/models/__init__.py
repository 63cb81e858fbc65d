"""Chest X-ray classifiers: VGG16, ResNet50, EfficientNet-B0 and EfficientNet-Lite0 backbones
with the paper's head, freezing policies, Grad-CAM target layers and weight loading.

The names (:mod:`.catalog`) import without torch; everything else loads on first use, so a
config module can check a backbone name without importing torch or torchvision.
"""

from __future__ import annotations

from ..lazy import lazy_attributes
from .catalog import BACKBONE_BLOCKS, BACKBONES, FREEZE_HELP, HEADS, parse_freeze

__getattr__, _lazy = lazy_attributes(
    __name__,
    backbones="IMAGENET_MEAN_STD SPECS BackboneSpec CxrClassifier build_model get_spec "
    "efficientnet_b0 efficientnet_lite0 resnet50 vgg16",
    heads="build_head",
    lite0="LITE0_MEAN_STD LITE0_STAGE_REPEATS lite0_state_dict lite0_weights_path "
    "rename_lite0_key timm_lite0_imagenet",
    weights="OFFLINE_ENV WeightsError WeightsNotFoundError WeightsUnavailableError "
    "load_imagenet_state_dict load_state_dict_uri state_dict_from_bytes",
)
__all__ = ["BACKBONES", "BACKBONE_BLOCKS", "FREEZE_HELP", "HEADS", "parse_freeze", *_lazy]
