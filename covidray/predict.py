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
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .codec import u8_to_unit_tensor, unit_to_u8_tensor
from .explain import GradCAM, cam_summary, normalize_cam
from .modeldir import ModelCard, load_model_dir
from .preprocess import to_model_input
from .runtime.threads import physical_cores

__all__ = [
    "BatchPrediction",
    "Prediction",
    "Predictor",
    "default_device",
    "predict_probs",
]

ImageBatch = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]


def fold_batchnorm(model: torch.nn.Module) -> int:
    """Fold each eval-mode ``BatchNorm2d`` into the ``Conv2d`` right before it in the same
    ``nn.Sequential`` (torchvision's Conv-BN-activation blocks); the BN becomes ``Identity``.

    Inference only: outputs change by float rounding (~1e-8), module names stay (hooks on a
    block still see the block's output). Subclasses such as timm's ``BatchNormAct2d`` are left
    alone. Returns the number of folded pairs.
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[a], seq._modules[b]
            if (
                type(conv) is nn.Conv2d
                and type(bn) is nn.BatchNorm2d
                and bn.track_running_stats
                and not (conv.training or bn.training)
            ):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
                folded += 1
    return folded


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Prediction:
    """One image's result (see :class:`BatchPrediction` for the fields)."""

    probs: np.ndarray  # (K,) float32
    label: str
    cam_class: str
    model_version: str
    classes: tuple[str, ...]
    cam_raw: np.ndarray | None = None  # (h, w) uint8
    cam_area: float | None = None
    cam_peak_y: float | None = None
    cam_peak_x: float | None = None
    cam_border_energy: float | None = None

    def prob(self, name: str) -> float:
        return float(self.probs[self.classes.index(name)])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the map itself)."""
        out: dict[str, Any] = {
            "label": self.label,
            "probs": {c: float(p) for c, p in zip(self.classes, self.probs, strict=True)},
            "model_version": self.model_version,
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

    ``probs`` (B, K) float32 softmax; ``labels`` the argmax class names; ``cam_class_idx`` (B,)
    the class each map explains (the predicted one unless asked otherwise). With CAMs:
    ``cam_raw`` (B, h, w) uint8, the raw Grad-CAM at the target layer's resolution divided by
    its per-image maximum; ``cam_area``, ``cam_peak_y``, ``cam_peak_x``, ``cam_border_energy``
    (B,) float32 from :func:`covidray.explain.cam_summary` of the map upsampled to the input.
    """

    probs: np.ndarray
    labels: list[str]
    cam_class_idx: np.ndarray
    model_version: str
    classes: tuple[str, ...]
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
        )

    def __iter__(self) -> Iterator[Prediction]:
        return (self[i] for i in range(len(self)))


class Predictor:
    """One model on one device, scoring batches of decoded images.

    Args:
        model: a :class:`covidray.models.CxrClassifier` (put in eval mode here).
        card: its :class:`ModelCard` (classes, input size, version, flip TTA).
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
        self.tta_hflip = bool(card.tta_hflip)
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
        self.folded = fold_batchnorm(model) if fold_bn else 0
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._cam = GradCAM(model)
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
        kwargs.setdefault("copy", False)
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
    ) -> BatchPrediction:
        """Probabilities, labels and (with ``with_cam``) Grad-CAM for a batch of images.

        ``class_idx`` chooses the class the maps explain (``None``: the predicted one). When
        the model card asks for flip TTA, probabilities average the image and its mirror and
        the map explains the class predicted from that average, on the unflipped image.
        """
        x = self.prepare(images)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            flipped = None
            if self.tta_hflip:
                with torch.inference_mode():
                    flipped = self.model(x.flip(-1)).float().softmax(dim=1)
            if not with_cam:
                with torch.inference_mode():
                    probs = self.model(x).float().softmax(dim=1)
                if flipped is not None:
                    probs = 0.5 * (probs + flipped)
                pred = probs.argmax(dim=1)
                return self._result(probs, pred, pred)
            res = self._cam(x, class_idx=class_idx)
            probs = res.probs if flipped is None else 0.5 * (res.probs + flipped)
            pred = probs.argmax(dim=1)
            if class_idx is None and flipped is not None and bool((pred != res.class_idx).any()):
                # The averaged prediction differs from the unflipped one: explain it instead.
                res = self._cam(x, class_idx=pred)
        maps = normalize_cam(res.raw)
        summary = cam_summary(res.cam, threshold=self.cam_threshold, border=self.cam_border)
        return self._result(
            probs,
            pred,
            res.class_idx,
            cam_raw=unit_to_u8_tensor(maps).cpu().numpy(),
            **{f"cam_{k}": v.float().cpu().numpy() for k, v in summary.items()},
        )

    def predict_one(self, image: torch.Tensor | np.ndarray, with_cam: bool = True) -> Prediction:
        """One ``1×H×W`` (or ``H×W``) image."""
        return self.predict([image], with_cam=with_cam)[0]

    def _result(
        self, probs: torch.Tensor, pred: torch.Tensor, explained: torch.Tensor, **cam: Any
    ) -> BatchPrediction:
        pred_np = pred.cpu().numpy()
        return BatchPrediction(
            probs=probs.float().cpu().numpy(),
            labels=[self.classes[i] for i in pred_np],
            cam_class_idx=explained.cpu().numpy(),
            model_version=self.model_version,
            classes=self.classes,
            **cam,
        )


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

    With ``tta_hflip`` the probabilities of each image and its mirror image are averaged.
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
                p = model(x).float().softmax(-1)
                if tta_hflip:
                    p = 0.5 * (p + model(x.flip(-1)).float().softmax(-1))
            out.append(p.cpu())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy()
