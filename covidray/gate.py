"""The input gate: is this a frontal chest X-ray the model was built for?

Three layers, in this order, reported on every prediction as ``in_scope``, ``gate_reason``
and ``ood_score`` (docs/gate.md):

- **metadata** (:func:`metadata_reason`): DICOM ``Modality`` other than CR/DX (CT, MR, US,
  and secondary captures SC/OT, often screenshots), ``BodyPartExamined`` other than the chest,
  lateral, decubitus and oblique ``ViewPosition``s are out of scope before any pixel reaches
  the model. A missing tag is no reason by itself.
- **image** (:class:`GateStats`): the Mahalanobis distance of the model's spatially pooled
  activations from the training films', with a Ledoit-Wolf shrunk covariance (a few hundred
  films cannot fill a covariance of hundreds of dimensions), thresholded so that a chosen
  share of the validation films (:data:`VAL_REJECTION`, 1 %: with 90 films, the farthest one
  sets the threshold) is refused. With several layers (``feature_layers``), each layer's
  distance is standardised by its mean and spread on the validation films and the sum is
  ``ood_score`` (Lee et al. 2018's multi-layer score, without their tuning on outliers). The
  default layers (:func:`default_gate_layers`) were re-chosen with the view check in place,
  on the validation split and synthetic out-of-scope kinds only (``bench/gate_rule.py``,
  docs/gate.md): for ``efficientnet_lite0`` the head's input plus ``features.blocks.5``; the
  head's input (``pool``) alone for the other backbones (not measured). A site chooses others
  with ``covidray calibrate --gate-layer``. The energy score of the logits (:func:`energy`) is
  no layer: measured beside the distance (``bench/trust.py``, ``bench/gate_layers.py
  --energy``) it separated every out-of-scope kind worse and, as a second layer at the same
  validation rejection, refused nothing the distance let through; its threshold is no longer
  stored. Statistics live in ``gate.safetensors`` in the model directory; a film refused here
  has ``gate_reason`` ``ood_image``.
- **view check** (:mod:`covidray.viewcheck`): of the films the distance lets through, those a
  small classifier on the same forward pass's features calls lateral (``image_view:lateral``).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator

GATE_STATS_NAME = "gate.safetensors"
FEATURE_LAYER = "pool"  # CxrClassifier.pool: the head's input; the one layer of early cards
VAL_REJECTION = 0.01  # share of in-scope validation films the threshold may refuse
# The image distance's layers by backbone, chosen by bench/gate_rule.py (docs/gate.md)
DEFAULT_GATE_LAYERS: dict[str, tuple[str, ...]] = {
    "efficientnet_lite0": (FEATURE_LAYER, "features.blocks.5"),
}
OOD_REASON = "ood_image"  # gate_reason of a film the image distance refuses

IN_SCOPE_MODALITIES = frozenset({"CR", "DX"})
CHEST = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_LAT", "CXR"})
LATERAL_OR_OBLIQUE = frozenset(
    {"L", "LL", "RL", "LAT", "LATERAL", "RLD", "LLD", "DECUBITUS", "OBL", "OBLIQUE"}
    | {"RAO", "LAO", "RPO", "LPO", "RLO", "LLO"}
)


class Gate(BaseModel):
    """The image layer's settings (stored in the model card)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["mahalanobis"] = "mahalanobis"
    feature_layers: tuple[str, ...] = (FEATURE_LAYER,)  # names inside the model
    # (mean, std) of each layer's distance on the validation films: ``ood_score`` is the sum of
    # the standardised distances. None (cards with one layer, before this): the raw distance.
    layer_scale: tuple[tuple[float, float], ...] | None = None
    threshold: float  # ood_score above this: out of scope
    shrinkage: tuple[float, ...]  # Ledoit-Wolf's, per layer
    dims: tuple[int, ...]  # channels per layer
    fitted_on: str  # e.g. "train (494 images); threshold on val (107)"
    val_rejection: float = 0.05  # cards written without it used 5 %; fit_gate sets it
    stats_file: str = GATE_STATS_NAME
    stats_sha256: str = ""

    @model_validator(mode="before")
    @classmethod
    def _one_layer_cards(cls, data: Any) -> Any:
        """Cards from before several layers: ``feature_layer``, ``dim`` and one shrinkage;
        the combined energy score they may record is no longer used. Cards from before this
        release record an ``energy_threshold`` that no layer used (``bench/gate_layers.py
        --energy``): dropped."""
        if isinstance(data, dict) and "energy_threshold" in data:
            data = {k: v for k, v in data.items() if k != "energy_threshold"}
        if isinstance(data, dict) and "feature_layer" in data:
            data = dict(data)
            data["feature_layers"] = (data.pop("feature_layer"),)
            data["dims"] = (data.pop("dim"),)
            data["shrinkage"] = (data["shrinkage"],)
            data.pop("val_scores", None)
            data.pop("combined_threshold", None)
        return data

    def score(self, distances: np.ndarray) -> np.ndarray:
        """``ood_score`` ``(B,)`` from per-layer distances ``(B, L)``."""
        d = np.asarray(distances, dtype=np.float64)
        if self.layer_scale is None:
            return d[:, 0]
        mean, std = np.asarray(self.layer_scale, dtype=np.float64).T
        return ((d - mean) / np.maximum(std, 1e-12)).sum(axis=1)


def default_gate_layers(backbone: str) -> tuple[str, ...]:
    """The image distance's default feature layers for ``backbone``."""
    return DEFAULT_GATE_LAYERS.get(backbone, (FEATURE_LAYER,))


def metadata_reason(tags: dict[str, Any]) -> str | None:
    """Why a DICOM header puts the image out of scope (``"modality:CT"``, ``"view:LL"``,
    ``"body_part:ABDOMEN"``), or None. Missing or empty tags give no reason."""
    modality = _upper(tags.get("modality"))
    if modality and modality not in IN_SCOPE_MODALITIES:
        return f"modality:{modality}"
    body = _upper(tags.get("body_part"))
    if body and body not in CHEST:
        return f"body_part:{body}"
    view = _upper(tags.get("view"))
    if view and (view in LATERAL_OR_OBLIQUE or "LAT" in view or "OBL" in view):
        return f"view:{view}"
    return None


def _upper(value: Any) -> str | None:
    text = str(value).strip().upper().replace(" ", "_") if value is not None else ""
    return text or None


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Shrunk covariance of the rows of ``x`` (Ledoit & Wolf 2004) and the shrinkage."""
    n, p = x.shape
    xc = x - x.mean(axis=0)
    x2 = xc**2
    emp_trace = x2.sum(axis=0) / n
    mu = emp_trace.sum() / p
    beta_ = float((x2.T @ x2).sum())
    delta_ = float(((xc.T @ xc) ** 2).sum()) / n**2
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2 * mu * emp_trace.sum() + p * mu**2) / p
    shrinkage = 0.0 if beta == 0 else min(beta, delta) / delta
    cov = (1 - shrinkage) * (xc.T @ xc) / n
    cov[np.diag_indices(p)] += shrinkage * mu
    return cov, float(shrinkage)


class GateStats:
    """Mean and precision of the training films' features, one block per feature layer;
    features arrive as one row per image with the layers' pooled channels side by side."""

    def __init__(self, means: list[np.ndarray], precisions: list[np.ndarray]) -> None:
        self.means = [np.asarray(m, dtype=np.float64) for m in means]
        self.precisions = [np.asarray(p, dtype=np.float64) for p in precisions]
        self.dims = tuple(len(m) for m in self.means)

    @classmethod
    def fit(cls, features: np.ndarray, dims: tuple[int, ...]) -> tuple[GateStats, list[float]]:
        """Statistics of ``features`` ``(N, sum(dims))``, and each layer's shrinkage."""
        means, precisions, shrinkage = [], [], []
        for block in _blocks(np.asarray(features, dtype=np.float64), dims):
            cov, s = ledoit_wolf(block)
            means.append(block.mean(axis=0))
            precisions.append(np.linalg.inv(cov))
            shrinkage.append(s)
        return cls(means, precisions), shrinkage

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distances ``(B, L)`` of feature rows ``(B, sum(dims))``, per layer."""
        out = []
        for block, mean, precision in zip(
            _blocks(np.asarray(features, dtype=np.float64), self.dims),
            self.means,
            self.precisions,
            strict=True,
        ):
            d = block - mean
            # (d P) · d row by row: a BLAS matrix product (einsum's "bi,ij,bj->b" is a naive
            # loop, measured 0.55 s per 256 images, 85 % of a GPU batch's time).
            out.append(np.sqrt(np.maximum(np.sum((d @ precision) * d, axis=1), 0.0)))
        return np.stack(out, axis=1)

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        tensors = {}
        for i, (m, p) in enumerate(zip(self.means, self.precisions, strict=True)):
            tensors[f"mean.{i}"], tensors[f"precision.{i}"] = m, p
        return save(tensors)

    @classmethod
    def from_bytes(cls, data: bytes) -> GateStats:
        from safetensors.numpy import load

        t = load(data)
        if "mean" in t:  # one layer, written before several
            return cls([t["mean"]], [t["precision"]])
        n = len([k for k in t if k.startswith("mean.")])
        return cls([t[f"mean.{i}"] for i in range(n)], [t[f"precision.{i}"] for i in range(n)])


def _blocks(features: np.ndarray, dims: tuple[int, ...]) -> list[np.ndarray]:
    if features.ndim != 2 or features.shape[1] != sum(dims):
        raise ValueError(f"expected features of shape (N, {sum(dims)}), got {features.shape}")
    return np.split(features, np.cumsum(dims)[:-1], axis=1)


def energy(logits: np.ndarray) -> np.ndarray:
    """The energy score ``-logsumexp(logits)`` (Liu et al. 2020): higher is less familiar."""
    return -torch.logsumexp(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()


def threshold_at(scores: np.ndarray, rejection: float) -> float:
    """The smallest score above which at most ``rejection`` of ``scores`` lie."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64), 1 - rejection, method="higher"))


def fit_gate(
    train_features: np.ndarray,
    val_features: np.ndarray,
    *,
    layers: tuple[str, ...] = (FEATURE_LAYER,),
    dims: tuple[int, ...] | None = None,
    rejection: float = VAL_REJECTION,
) -> tuple[Gate, GateStats]:
    """Statistics from the training films, per-layer scales and thresholds from the
    validation films; features ``(N, sum(dims))``, the ``layers``' channels side by side
    (``dims`` may be left out for one layer)."""
    dims = dims or (int(np.shape(train_features)[1]),)
    if len(dims) != len(layers):
        raise ValueError(f"{len(layers)} layers but {len(dims)} feature blocks")
    stats, shrinkage = GateStats.fit(train_features, dims)
    distances = stats.distances(val_features)
    scale = tuple((float(c.mean()), float(c.std())) for c in distances.T)
    gate = Gate(
        feature_layers=layers,
        layer_scale=scale,
        threshold=0.0,
        shrinkage=tuple(shrinkage),
        dims=dims,
        fitted_on=f"train ({len(train_features)} images); threshold on val ({len(val_features)})",
        val_rejection=rejection,
    )
    threshold = threshold_at(gate.score(distances), rejection)
    return gate.model_copy(update={"threshold": threshold}), stats
