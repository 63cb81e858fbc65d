"""Grad-CAM (Selvaraju et al. 2017) computed in the same forward pass as the prediction.

``GradCAM(model)(x)`` runs the model once on a batch and returns its logits, probabilities and
one class activation map per image (:class:`CamResult`). The map for image ``i`` and class
``c`` is ``ReLU(sum_k alpha_k A_k)``, where ``A`` is the target layer's output and ``alpha_k``
the spatial mean of ``d logit[i, c] / d A_k`` (the logit, not the softmax probability, as
pytorch-grad-cam's ``ClassifierOutputTarget`` does).

How it stays about as cheap as plain inference:

* The forward runs under :func:`torch.no_grad`, so the layers below the target layer record
  no autograd graph and keep no activations, exactly as in inference.
* A forward hook on the target layer detaches its output, makes that a leaf that requires
  grad and switches grad mode on (grad mode is thread-local; the surrounding ``no_grad``
  context restores the caller's mode when the forward ends, also on errors). Only the layers
  above the target (for the CxrClassifier backbones: global pooling and the head) build a
  graph.
* :func:`torch.autograd.grad` differentiates the selected logits with respect to that leaf
  only: no full backward pass, and no parameter's ``.grad`` is touched.

Nothing is left behind: the hook is removed in ``finally``, every submodule's train/eval flag
and the caller's grad mode are restored. The model runs in eval mode during the call (dropout
off, BatchNorm on running statistics: images of a batch are then independent, so one
backward through the sum of the selected logits gives every image its own gradients). The
temporary switch to eval mode makes concurrent calls on the *same* model from several
threads unsafe while it is training; one :class:`GradCAM` per serving replica is fine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CamResult", "GradCAM", "normalize_cam"]


@dataclass
class CamResult:
    """What one :class:`GradCAM` call returns (all tensors detached, on the input's device).

    Attributes:
        logits: ``(B, K)`` logits of the forward pass the maps were computed in.
        probs: ``(B, K)`` softmax of ``logits`` (float32).
        class_idx: ``(B,)`` int64, the class each map explains (predicted or requested).
        raw: ``(B, h, w)`` float32 ``ReLU(sum_k alpha_k A_k)`` at the target layer's
            resolution, before upsampling and normalization.
        cam: ``(B, H, W)`` float32 in [0, 1]: ``raw`` upsampled (bilinear) to the input size
            and divided by its per-image maximum (an all-zero map stays zero). With
            ``upsample=False``, the normalized map at the target layer's resolution.
    """

    logits: Tensor
    probs: Tensor
    class_idx: Tensor
    raw: Tensor
    cam: Tensor

    @property
    def pred(self) -> Tensor:
        """``(B,)`` predicted class (argmax of the logits)."""
        return self.logits.argmax(dim=1)

    @property
    def score(self) -> Tensor:
        """``(B,)`` probability of the explained class."""
        return self.probs.gather(1, self.class_idx[:, None]).squeeze(1)


def normalize_cam(cam: Tensor) -> Tensor:
    """Divide each map of a ``(B, H, W)`` batch by its maximum (all-zero maps stay zero)."""
    peak = cam.amax(dim=(-2, -1), keepdim=True)
    return cam / torch.where(peak > 0, peak, torch.ones_like(peak))


class GradCAM:
    """Grad-CAM for a batch, in the forward pass that also yields the prediction.

    Args:
        model: a classifier taking ``B x C x H x W`` and returning ``(B, K)`` logits, e.g. a
            :class:`covidray.models.CxrClassifier`.
        target_layer: the layer whose output is explained: a submodule of ``model``, its
            dotted name (``"features.layer4"``) or ``None`` for ``model.target_layer``. Its
            output must be a ``B x K x h x w`` tensor, and it must run once per forward.

    Example::

        cam = GradCAM(model)
        res = cam(x)  # x: B x 1 x 224 x 224 in [0, 1], on the model's device
        res.probs, res.class_idx, res.cam  # prediction and the map explaining it
        cam(x, class_idx=0).cam  # maps explaining class 0 for every image
    """

    def __init__(self, model: nn.Module, target_layer: nn.Module | str | None = None) -> None:
        self.model = model
        self.target_layer = self._resolve(model, target_layer)

    @staticmethod
    def _resolve(model: nn.Module, target_layer: nn.Module | str | None) -> nn.Module:
        if target_layer is None:
            layer = getattr(model, "target_layer", None)
            if not isinstance(layer, nn.Module):
                raise ValueError(
                    f"{type(model).__name__} has no 'target_layer' module; pass target_layer "
                    "(a submodule or its dotted name)"
                )
            return layer
        if isinstance(target_layer, str):
            try:
                return model.get_submodule(target_layer)
            except AttributeError as e:
                raise ValueError(f"model has no submodule {target_layer!r}") from e
        if not isinstance(target_layer, nn.Module):
            raise TypeError(f"target_layer must be a module, a name or None, not {target_layer!r}")
        if not any(m is target_layer for m in model.modules()):
            raise ValueError("target_layer is not a submodule of model")
        return target_layer

    def __call__(
        self,
        x: Tensor,
        class_idx: int | Sequence[int] | Tensor | None = None,
        *,
        upsample: bool = True,
    ) -> CamResult:
        """Predict ``x`` and explain, per image, ``class_idx`` (``None``: the predicted class;
        an int: that class for every image; a sequence or tensor of ``B`` ints: one class per
        image)."""
        if x.ndim != 4:
            raise ValueError(f"expected a B x C x H x W batch, got shape {tuple(x.shape)}")
        captured: list[Tensor] = []

        def hook(module: nn.Module, args: object, output: object) -> Tensor:
            if not isinstance(output, Tensor) or output.ndim != 4:
                raise TypeError(
                    "Grad-CAM target layer must output a B x K x h x w tensor, got "
                    f"{type(output).__name__}{tuple(getattr(output, 'shape', ()))}"
                )
            if captured:
                raise RuntimeError("Grad-CAM target layer ran more than once in one forward")
            leaf = output.detach().requires_grad_(True)
            captured.append(leaf)
            # Record the graph from here on only; the enclosing no_grad() restores the mode.
            torch.set_grad_enabled(True)
            # A copy, so that an in-place op downstream cannot touch the leaf (or fail on it).
            return leaf.clone()

        model = self.model
        modes = [(m, m.training) for m in model.modules()]  # restored one by one afterwards
        handle = self.target_layer.register_forward_hook(hook)
        try:
            model.eval()
            with torch.inference_mode(False):
                with torch.no_grad():
                    logits = model(x)
                if not captured:
                    raise RuntimeError("the Grad-CAM target layer did not run in the forward pass")
                act = captured[0]
                if not (isinstance(logits, Tensor) and logits.ndim == 2 and logits.requires_grad):
                    raise RuntimeError(
                        "model output must be (B, K) logits computed from the target layer's output"
                    )
                idx = self._class_index(class_idx, logits)
                with torch.enable_grad():  # also when the caller runs under no_grad
                    selected = logits.gather(1, idx[:, None]).float().sum()
                (grads,) = torch.autograd.grad(selected, act)
        finally:
            handle.remove()
            for m, training in modes:
                m.training = training

        a = act.detach().float()
        alpha = grads.float().mean(dim=(2, 3), keepdim=True)
        raw = F.relu((alpha * a).sum(dim=1)).contiguous()
        out = raw
        if upsample and raw.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(
                raw[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False
            )[:, 0]
        logits = logits.detach()
        return CamResult(
            logits=logits,
            probs=logits.float().softmax(dim=1),
            class_idx=idx,
            raw=raw,
            cam=normalize_cam(out),
        )

    @staticmethod
    def _class_index(class_idx: int | Sequence[int] | Tensor | None, logits: Tensor) -> Tensor:
        b, k = logits.shape
        if class_idx is None:
            return logits.detach().argmax(dim=1)
        if isinstance(class_idx, int):
            idx = torch.full((b,), class_idx, dtype=torch.long, device=logits.device)
        else:
            idx = torch.as_tensor(class_idx, device=logits.device).long().reshape(-1)
            if idx.numel() == 1 and b != 1:
                idx = idx.expand(b)
            if idx.numel() != b:
                raise ValueError(f"class_idx has {idx.numel()} entries for a batch of {b}")
        if bool(((idx < 0) | (idx >= k)).any()):
            raise ValueError(f"class_idx must lie in [0, {k}), got {idx.tolist()}")
        return idx
