"""Scoring decoded chest X-rays with a model directory: probabilities, labels and Grad-CAM.

:class:`Predictor` is what the nightly job (``covidray score``) and the HTTP endpoint share. It
holds one model on one device and turns a batch of decoded images into a
:class:`BatchPrediction`: class probabilities, the predicted label, the model version and, with
``with_cam=True``, the Grad-CAM map of the explained class computed in the same forward pass
(see ``covidray.explain.gradcam``) with its summary numbers (area, peak, border energy).

Device settings are chosen at run time: CUDA when present, with autocast (bfloat16 where
supported, else float16); channels_last memory format on every device (oneDNN and cuDNN both
run EfficientNet/ResNet convolutions faster in NHWC); BatchNorm folded into the convolutions
(logits equal to ~1e-8; the README's benchmarks give the speed-up); torch threads set
explicitly (default: the physical cores available to this process). On shared CPUs start the
process with ``OMP_WAIT_POLICY=PASSIVE``: spinning OpenMP threads slow multi-threaded
inference down many times under load (the scoring job sets it for its actors).

:func:`predict_probs` is the plain batched softmax (with flip TTA) that training's validation
uses on its decode-once uint8 cache. Nothing here knows about Ray or HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from .codec import u8_to_unit_tensor, unit_to_u8_tensor
from .explain import GradCAM, cam_summary, normalize_cam
from .gate import FEATURE_LAYER, OOD_REASON, GateStats
from .modeldir import ModelCard, load_model_dir, read_gate_stats, read_view_stats
from .preprocess import to_model_input
from .runtime.threads import physical_cores
from .viewcheck import LATERAL_REASON, ViewWeights

__all__ = [
    "BatchPrediction",
    "Prediction",
    "Predictor",
    "default_device",
    "predict_probs",
    "select_layers",
]

ImageBatch = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]


def fold_batchnorm(model: torch.nn.Module) -> int:
    """Fold each eval-mode BatchNorm into the convolution right before it: consecutive children
    of an ``nn.Sequential`` (torchvision's Conv-BN-activation blocks; the Lite0 trunk's
    ``conv_stem, bn1`` and ``conv_head, bn2``) and the named pairs of timm's EfficientNet blocks
    (``conv_dw``/``bn1``, ``conv_pw``/``bn2``, ...). A ``BatchNorm2d`` becomes ``Identity``;
    timm's ``BatchNormAct2d`` (batch norm, dropout and activation in one module) becomes its
    dropout and activation alone, under the same name.

    Inference only: outputs change by float rounding (~1e-6 of the logits), module names stay
    (hooks on a block or on a ``BatchNormAct2d`` still see its output). Returns the number of
    folded pairs.
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for parent in list(model.modules()):
        for a, b in _conv_bn_pairs(parent):
            conv, bn = parent._modules.get(a), parent._modules.get(b)
            if not _foldable(conv, bn):
                continue
            parent._modules[a] = fuse_conv_bn_eval(conv, bn)
            rest = [getattr(bn, "drop", None), getattr(bn, "act", None)]
            rest = [m for m in rest if m is not None and not isinstance(m, nn.Identity)]
            parent._modules[b] = (
                nn.Identity() if not rest else rest[0] if len(rest) == 1 else nn.Sequential(*rest)
            )
            folded += 1
    return folded


# Conv → BN pairs inside timm's EfficientNet blocks, by attribute name (their forward order).
_TIMM_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "DepthwiseSeparableConv": (("conv_s2d", "bn_s2d"), ("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "InvertedResidual": (
        ("conv_s2d", "bn_s2d"),
        ("conv_pw", "bn1"),
        ("conv_dw", "bn2"),
        ("conv_pwl", "bn3"),
    ),
    "EdgeResidual": (("conv_exp", "bn1"), ("conv_pwl", "bn2")),
    "ConvBnAct": (("conv", "bn1"),),
}


def _conv_bn_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    if isinstance(parent, nn.Sequential):
        names = list(parent._modules)
        return list(zip(names, names[1:], strict=False))
    if type(parent).__module__.startswith("timm."):
        return list(_TIMM_PAIRS.get(type(parent).__name__, ()))
    return []


def _foldable(conv: nn.Module | None, bn: nn.Module | None) -> bool:
    """A plain (or timm "same"-padded) Conv2d followed by an eval-mode BatchNorm2d or timm
    BatchNormAct2d with running statistics."""
    conv_ok = type(conv) is nn.Conv2d or (
        isinstance(conv, nn.Conv2d) and type(conv).__name__ == "Conv2dSame"
    )
    bn_ok = type(bn) is nn.BatchNorm2d or (
        isinstance(bn, nn.BatchNorm2d) and type(bn).__name__ == "BatchNormAct2d"
    )
    return (
        conv_ok
        and bn_ok
        and bn.track_running_stats
        and bn.running_mean is not None
        and not (conv.training or bn.training)
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Prediction:
    """One image's result (see :class:`BatchPrediction` for the fields)."""

    probs: np.ndarray  # (K,) float32, calibrated
    label: str | None  # None: out of scope for the input gate
    cam_class: str
    model_version: str
    classes: tuple[str, ...]
    cam_raw: np.ndarray | None = None  # (h, w) uint8
    cam_area: float | None = None
    cam_peak_y: float | None = None
    cam_peak_x: float | None = None
    cam_border_energy: float | None = None
    in_scope: bool = True
    gate_reason: str | None = None
    ood_score: float | None = None
    lateral_prob: float | None = None  # the view check's P(lateral); None without one

    def prob(self, name: str) -> float:
        return float(self.probs[self.classes.index(name)])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the map itself)."""
        out: dict[str, Any] = {
            "label": self.label,
            "probs": {c: float(p) for c, p in zip(self.classes, self.probs, strict=True)},
            "model_version": self.model_version,
            "in_scope": self.in_scope,
            "gate_reason": self.gate_reason,
            "ood_score": self.ood_score,
            "lateral_prob": self.lateral_prob,
        }
        if self.cam_raw is not None:
            out["cam"] = {
                "class": self.cam_class,
                "area": self.cam_area,
                "peak_y": self.cam_peak_y,
                "peak_x": self.cam_peak_x,
                "border_energy": self.cam_border_energy,
                "shape": list(self.cam_raw.shape),
            }
        return out


@dataclass(frozen=True)
class BatchPrediction:
    """Results for a batch of ``B`` images (numpy, on the CPU).

    ``probs`` (B, K) float32: the softmax of the calibrated, flip-averaged logits; ``logits``
    (B, K) the flip-averaged logits before calibration; ``labels`` the argmax class names, None
    where the input gate refuses the image (``in_scope`` (B,) bool, ``gate_reason``,
    ``ood_score`` (B,) float64 or None without a gate); ``cam_class_idx`` (B,) the class each
    map explains (the predicted one unless asked otherwise). With CAMs: ``cam_raw`` (B, h, w)
    uint8, the raw Grad-CAM at the target layer's resolution divided by its per-image maximum;
    ``cam_area``, ``cam_peak_y``, ``cam_peak_x``, ``cam_border_energy`` (B,) float32 from
    :func:`covidray.explain.cam_summary` of the map upsampled to the input. ``features``
    (B, D): the feature layers' spatially pooled outputs side by side, when asked for.
    ``lateral_prob`` (B,): the view check's probability that the film is lateral (None
    without a view check); ``gate_reason`` is ``ood_image`` (the image distance) or
    ``image_view:lateral`` (the view check, for films the distance let through).
    """

    probs: np.ndarray
    labels: list[str | None]
    cam_class_idx: np.ndarray
    model_version: str
    classes: tuple[str, ...]
    logits: np.ndarray
    in_scope: np.ndarray
    gate_reason: list[str | None]
    scoring_version: str = ""
    ood_score: np.ndarray | None = None
    features: np.ndarray | None = None
    feature_dims: tuple[int, ...] | None = None  # each feature layer's columns, in order
    lateral_prob: np.ndarray | None = None
    cam_raw: np.ndarray | None = None
    cam_area: np.ndarray | None = None
    cam_peak_y: np.ndarray | None = None
    cam_peak_x: np.ndarray | None = None
    cam_border_energy: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Prediction:
        def pick(a: np.ndarray | None) -> float | None:
            return None if a is None else float(a[i])

        return Prediction(
            probs=self.probs[i],
            label=self.labels[i],
            cam_class=self.classes[int(self.cam_class_idx[i])],
            model_version=self.model_version,
            classes=self.classes,
            cam_raw=None if self.cam_raw is None else self.cam_raw[i],
            cam_area=pick(self.cam_area),
            cam_peak_y=pick(self.cam_peak_y),
            cam_peak_x=pick(self.cam_peak_x),
            cam_border_energy=pick(self.cam_border_energy),
            in_scope=bool(self.in_scope[i]),
            gate_reason=self.gate_reason[i],
            ood_score=pick(self.ood_score),
            lateral_prob=pick(self.lateral_prob),
        )

    def __iter__(self) -> Iterator[Prediction]:
        return (self[i] for i in range(len(self)))

    @classmethod
    def concat(cls, parts: Sequence[BatchPrediction]) -> BatchPrediction:
        """One BatchPrediction of consecutive batches' results (same model)."""
        first = parts[0]
        merged: dict[str, Any] = {}
        for f in fields(cls):
            values = [getattr(p, f.name) for p in parts]
            if isinstance(values[0], np.ndarray):
                merged[f.name] = np.concatenate(values)
            elif isinstance(values[0], list):
                merged[f.name] = [v for part in values for v in part]
            else:  # per-model values, or None for a field no batch has
                merged[f.name] = getattr(first, f.name)
        return cls(**merged)


class Predictor:
    """One model on one device, scoring batches of decoded images.

    Args:
        model: a :class:`covidray.models.CxrClassifier` (put in eval mode here).
        card: its :class:`ModelCard` (classes, input size, version, flip TTA, calibration,
            input gate).
        gate_stats: the gate's feature statistics (``from_dir`` reads them); without them
            the image distance refuses nothing and ``ood_score`` is None.
        view_weights: the view check's parameters (``from_dir`` reads them); without them no
            film is refused as lateral and ``lateral_prob`` is None.
        gate_layers: the layers ``return_features`` pools without a gate (default: the head's
            input, ``pool``); with a gate, the card's (then the view check's, if others).
        device: ``None`` picks CUDA when available, else the CPU.
        compile: ``torch.compile`` the backbone stages below the Grad-CAM target layer (the
            target layer and the head stay eager, so the CAM hook works unchanged).
        amp: autocast (bfloat16 where supported, else float16); ``None``: on CUDA only.
        threads: torch intra-op threads; ``None``: the physical cores on the CPU, untouched on
            CUDA. Note that this is a process-wide setting.
        channels_last: NHWC memory format for model and inputs.
        fold_bn: fold BatchNorm into the preceding convolutions (:func:`fold_batchnorm`).
        copy: work on a copy of ``model`` (``from_dir`` owns its model and skips it).
        cam_threshold, cam_border: parameters of :func:`covidray.explain.cam_summary`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        card: ModelCard,
        *,
        device: str | torch.device | None = None,
        compile: bool = False,
        amp: bool | None = None,
        threads: int | None = None,
        channels_last: bool = True,
        fold_bn: bool = True,
        cam_threshold: float = 0.5,
        cam_border: float = 0.10,
        copy: bool = True,
        gate_stats: GateStats | None = None,
        gate_layers: Sequence[str] | None = None,
        view_weights: ViewWeights | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        if threads is None and self.device.type == "cpu":
            threads = physical_cores()
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        self.threads = torch.get_num_threads()
        self.card = card
        self.classes: tuple[str, ...] = tuple(card.classes)
        self.input_size = int(card.preprocessing.input_size)
        self.model_version = card.model_version
        self.scoring_version = card.scoring_version
        self.tta_hflip = bool(card.tta_hflip)
        self.calibration = card.effective_calibration
        self.gate = card.gate if gate_stats is not None else None
        self.gate_stats = gate_stats
        self.view = card.view_check if view_weights is not None else None
        self.view_weights = view_weights
        self.channels_last = channels_last
        self.amp = self.device.type == "cuda" if amp is None else bool(amp)
        self.amp_dtype = (
            torch.float16
            if self.device.type == "cuda" and not torch.cuda.is_bf16_supported()
            else torch.bfloat16
        )
        self.cam_threshold = cam_threshold
        self.cam_border = cam_border
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels
        if copy:
            model = deepcopy(model)
        model = model.eval().to(self.device)
        first = (
            tuple(self.gate.feature_layers)
            if self.gate is not None
            else tuple(gate_layers or (FEATURE_LAYER,))
        )
        view_layers = tuple(self.view.feature_layers) if self.view is not None else ()
        self.feature_layers = first + tuple(n for n in view_layers if n not in first)
        unfolded = [feature_module(model, n) for n in self.feature_layers]
        self.folded = fold_batchnorm(model) if fold_bn else 0
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._cam = GradCAM(model)
        self._feature_modules = [model.get_submodule(n) for n in self.feature_layers]
        for name, before, after in zip(
            self.feature_layers, unfolded, self._feature_modules, strict=True
        ):
            if after is not before and isinstance(before, nn.Conv2d):
                # Its output would depend on fold_bn: the gate's statistics would not carry over.
                raise ValueError(
                    f"feature layer {name!r} is a convolution with a BatchNorm folded into it: "
                    "use the normalisation or activation layer after it"
                )
        self.compiled = False
        if compile:
            self._compile_below_target()

    @classmethod
    def from_dir(
        cls,
        uri: str,
        device: str | torch.device | None = None,
        compile: bool = False,
        amp: bool | None = None,
        **kwargs: Any,
    ) -> Predictor:
        """Load the model directory ``uri`` (local or s3://; weights verified) onto ``device``."""
        model, card = load_model_dir(uri)
        stats = read_gate_stats(uri, card)
        view = read_view_stats(uri, card)
        kwargs.setdefault("copy", False)
        kwargs.setdefault("gate_stats", GateStats.from_bytes(stats) if stats else None)
        kwargs.setdefault("view_weights", ViewWeights.from_bytes(view) if view else None)
        return cls(model, card, device=device, compile=compile, amp=amp, **kwargs)

    def _compile_below_target(self) -> None:
        """Compile, in place, each backbone stage that does not contain the target layer."""
        target = self._cam.target_layer
        features = getattr(self.model, "features", None)
        if features is None:
            self.model.compile()
            self.compiled = True
            return
        for child in features.children():
            if any(m is target for m in child.modules()):
                continue
            child.compile()
            self.compiled = True

    # --- inputs ----------------------------------------------------------------------------
    def prepare(self, images: ImageBatch) -> torch.Tensor:
        """Images → ``B×1×S×S`` float in [0, 1] on the device (channels_last when set).

        ``images`` is a ``B×1×H×W`` (or ``B×H×W``) tensor/array, or a sequence of ``1×H×W``
        (or ``H×W``) ones; uint8 is read as 0..255, floats as [0, 1]. Images not already
        ``S×S`` are squash-resized with :func:`covidray.preprocess.to_model_input`.
        """
        size = self.input_size
        if isinstance(images, torch.Tensor | np.ndarray):
            x = torch.as_tensor(images)
            if x.ndim == 3:
                x = x[:, None]
            if x.ndim != 4 or x.shape[1] != 1:
                raise ValueError(f"expected B×1×H×W images, got shape {tuple(x.shape)}")
            if x.shape[-2:] != (size, size):
                x = to_model_input(_to_float(x), size)
        else:
            parts = []
            for img in images:
                t = torch.as_tensor(img)
                t = t[None] if t.ndim == 2 else t
                if t.ndim != 3 or t.shape[0] != 1:
                    raise ValueError(f"expected 1×H×W images, got shape {tuple(t.shape)}")
                parts.append(
                    t if t.shape[-2:] == (size, size) else to_model_input(_to_float(t), size)
                )
            if not parts:
                raise ValueError("no images to predict")
            dtypes = {p.dtype for p in parts}
            x = torch.stack(parts if len(dtypes) == 1 else [_to_float(p) for p in parts])
        # Move uint8 before converting: 4× less to copy to a GPU.
        x = _to_float(x.to(self.device, non_blocking=True))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # --- prediction ------------------------------------------------------------------------
    def predict(
        self,
        images: ImageBatch,
        with_cam: bool = True,
        class_idx: int | Sequence[int] | None = None,
        *,
        return_features: bool = False,
    ) -> BatchPrediction:
        """Probabilities, labels, the input gate's verdict and (with ``with_cam``) Grad-CAM for
        a batch of images.

        With flip TTA (the card's ``tta_hflip``) the logits of the image and its mirror are
        averaged, then calibrated (the card's temperature), then softmaxed; the map explains
        ``class_idx`` (``None``: the class predicted from that average) on the unflipped
        image, whose feature layers also feed the gate.
        """
        x = self.prepare(images)
        feats: list[torch.Tensor] = []
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            flipped = None
            if self.tta_hflip:
                with torch.inference_mode():
                    flipped = self.model(x.flip(-1)).float()
            gated = self.gate is not None or self.view is not None
            with self._capture(feats, gated or return_features):
                if with_cam:
                    res = self._cam(x, class_idx=class_idx)
                    logits = res.logits.float()
                else:
                    with torch.inference_mode():
                        logits = self.model(x).float()
            avg = logits if flipped is None else 0.5 * (logits + flipped)
            probs = self.calibration.apply(avg).softmax(dim=1)
            pred = probs.argmax(dim=1)
            if with_cam and class_idx is None and bool((pred != res.class_idx).any()):
                # The averaged prediction differs from the unflipped one: explain it instead.
                res = self._cam(x, class_idx=pred)
        features = torch.cat(feats, dim=1).cpu().numpy() if feats else None
        feature_dims = tuple(int(f.shape[1]) for f in feats) if feats else None
        cam: dict[str, Any] = {}
        if with_cam:
            summary = cam_summary(res.cam, threshold=self.cam_threshold, border=self.cam_border)
            cam = {
                "cam_raw": unit_to_u8_tensor(normalize_cam(res.raw)).cpu().numpy(),
                **{f"cam_{k}": v.float().cpu().numpy() for k, v in summary.items()},
            }
        return self._result(
            probs,
            avg,
            pred,
            res.class_idx if with_cam else pred,
            features,
            feature_dims,
            return_features,
            **cam,
        )

    @contextmanager
    def _capture(self, into: list[torch.Tensor], enabled: bool) -> Iterator[None]:
        """Collect each feature layer's output, averaged over space (detached, float32), in
        :attr:`feature_layers`' order, during the block (one forward pass)."""
        if not enabled:
            yield
            return
        outputs: dict[int, torch.Tensor] = {}

        def hook(i: int) -> Any:
            def keep(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
                out = output.detach().float()
                outputs[i] = out.mean(dim=(2, 3)) if out.ndim == 4 else out.flatten(1)

            return keep

        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(self._feature_modules)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        into.extend(outputs[i] for i in range(len(self._feature_modules)))

    def predict_many(
        self, images: torch.Tensor | np.ndarray, batch_size: int = 64, **kwargs: Any
    ) -> BatchPrediction:
        """:meth:`predict` over ``images`` (``N×1×H×W``) in batches of ``batch_size``."""
        parts = [
            self.predict(images[i : i + batch_size], **kwargs)
            for i in range(0, len(images), batch_size)
        ]
        if not parts:
            raise ValueError("no images to predict")
        return BatchPrediction.concat(parts)

    def _result(
        self,
        probs: torch.Tensor,
        logits: torch.Tensor,
        pred: torch.Tensor,
        explained: torch.Tensor,
        features: np.ndarray | None,
        feature_dims: tuple[int, ...] | None,
        keep_features: bool,
        **cam: Any,
    ) -> BatchPrediction:
        pred_np = pred.cpu().numpy()
        n = len(pred_np)
        ood = lateral = None
        reasons: list[str | None] = [None] * n
        in_scope = np.ones(n, dtype=bool)
        if features is not None and feature_dims is not None:
            if self.gate is not None and self.gate_stats is not None:
                mine = select_layers(
                    features, self.feature_layers, feature_dims, self.gate.feature_layers
                )
                ood = self.gate.score(self.gate_stats.distances(mine))
                far = ood > self.gate.threshold
                reasons = [OOD_REASON if f else None for f in far]
                in_scope &= ~far
            if self.view is not None and self.view_weights is not None:
                mine = select_layers(
                    features, self.feature_layers, feature_dims, self.view.feature_layers
                )
                lateral = self.view_weights.lateral_probability(mine)
                # After the distance: only films it let through are the view check's.
                side = in_scope & (lateral > self.view.threshold)
                reasons = [LATERAL_REASON if s else r for r, s in zip(reasons, side, strict=True)]
                in_scope &= ~side
        return BatchPrediction(
            probs=probs.float().cpu().numpy(),
            labels=[
                self.classes[i] if ok else None for i, ok in zip(pred_np, in_scope, strict=True)
            ],
            cam_class_idx=explained.cpu().numpy(),
            model_version=self.model_version,
            classes=self.classes,
            logits=logits.float().cpu().numpy(),
            in_scope=in_scope,
            gate_reason=reasons,
            scoring_version=self.scoring_version,
            ood_score=ood,
            features=features if keep_features else None,
            feature_dims=feature_dims if keep_features else None,
            lateral_prob=lateral,
            **cam,
        )


def select_layers(
    features: np.ndarray, layers: Sequence[str], dims: Sequence[int], wanted: Sequence[str]
) -> np.ndarray:
    """The columns of the ``wanted`` layers (a gate's or a view check's, in its order) from
    feature rows whose ``layers`` (of ``dims`` channels each) sit side by side."""
    layers = list(layers)
    if list(wanted) == layers:
        return features
    edges = np.concatenate([[0], np.cumsum(dims)])
    where = [layers.index(n) for n in wanted]
    cols = [np.arange(edges[i], edges[i + 1]) for i in where]
    return features[:, np.concatenate(cols)]


def trunk_stages(model: nn.Module) -> list[str]:
    """The names of ``model.features``' children, with a container of stages (timm's
    ``blocks``) opened: the candidate feature layers of the input gate, beside ``pool``."""
    trunk = getattr(model, "features", None)
    names: list[str] = []
    for name, child in trunk.named_children() if trunk is not None else ():
        kids = list(child.named_children())
        if len(kids) >= 2 and all(isinstance(k, nn.Sequential) for _, k in kids):
            names += [f"features.{name}.{k}" for k, _ in kids]
        else:
            names.append(f"features.{name}")
    return names


def feature_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of ``model``, or a ValueError naming the candidates."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        candidates = ", ".join([FEATURE_LAYER, *trunk_stages(model)])
        raise ValueError(f"no layer {name!r} in the model; candidates: {candidates}") from None


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images_u8: torch.Tensor,
    *,
    batch_size: int = 64,
    tta_hflip: bool = False,
    device: torch.device | str | None = None,
    autocast: bool = False,
) -> np.ndarray:
    """Softmax probabilities ``(N, C)`` for cached uint8 images, model in eval mode.

    With ``tta_hflip`` the logits of each image and its mirror image are averaged before the
    softmax, as :meth:`Predictor.predict` does (without its calibration: this is the raw model
    that training validates).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images_u8), batch_size):
            x = u8_to_unit_tensor(
                images_u8[start : start + batch_size].to(device, non_blocking=True)
            )
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                z = model(x).float()
                if tta_hflip:
                    z = 0.5 * (z + model(x.flip(-1)).float())
            out.append(z.softmax(-1).cpu())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, getattr(model, "num_classes", 0)), dtype=np.float32)  # an empty shard
    return torch.cat(out).numpy()
