"""The input gate: is this a frontal chest X-ray the model was built for?

Two layers, reported on every prediction as ``in_scope``, ``gate_reason`` and ``ood_score``:

- **metadata** (:func:`metadata_reason`): DICOM ``Modality`` other than CR/DX (CT, MR, US,
  and secondary captures SC/OT, often screenshots), ``BodyPartExamined`` other than the chest,
  lateral, decubitus and oblique ``ViewPosition``s are out of scope before any pixel reaches
  the model. A missing tag is no reason by itself.
- **image** (:class:`GateStats`): the Mahalanobis distance of the model's pooled features (the
  head's input) from the training films', with a Ledoit-Wolf shrunk covariance (a few hundred
  films cannot estimate 1280 × 1280 entries), thresholded so that a chosen share of the
  validation films (5 %) is refused. The energy score of the logits is computed alongside, for
  comparison only. Statistics live in ``gate.safetensors`` in the model directory.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

GATE_STATS_NAME = "gate.safetensors"
FEATURE_LAYER = "pool"  # CxrClassifier.pool: global average pool → (B, D), the head's input
VAL_REJECTION = 0.05  # share of in-scope validation films the threshold may refuse

IN_SCOPE_MODALITIES = frozenset({"CR", "DX"})
CHEST = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_LAT", "CXR"})
LATERAL_OR_OBLIQUE = frozenset(
    {"LL", "RL", "LAT", "LATERAL", "RLD", "LLD", "DECUBITUS", "OBL", "OBLIQUE"}
    | {"RAO", "LAO", "RPO", "LPO", "RLO", "LLO"}
)


class Gate(BaseModel):
    """The image layer's settings (stored in the model card)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["mahalanobis"] = "mahalanobis"
    feature_layer: str = FEATURE_LAYER
    threshold: float  # ood_score above this: out of scope
    energy_threshold: float  # the energy score's threshold at the same val rejection
    shrinkage: float
    dim: int
    fitted_on: str  # e.g. "train (494 images); threshold on val (107)"
    val_rejection: float = VAL_REJECTION
    # (mean, std) of each score on the validation films, to compare the methods on one scale
    # (:func:`combined_score`); None in cards from before they were recorded.
    val_scores: dict[str, tuple[float, float]] | None = None
    combined_threshold: float | None = None  # combined_score's, at the same val rejection
    stats_file: str = GATE_STATS_NAME
    stats_sha256: str = ""


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
    """Mean and precision of the training films' features."""

    def __init__(self, mean: np.ndarray, precision: np.ndarray) -> None:
        self.mean = np.asarray(mean, dtype=np.float64)
        self.precision = np.asarray(precision, dtype=np.float64)

    @classmethod
    def fit(cls, features: np.ndarray) -> tuple[GateStats, float]:
        cov, shrinkage = ledoit_wolf(np.asarray(features, dtype=np.float64))
        return cls(features.mean(axis=0), np.linalg.inv(cov)), shrinkage

    def score(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distances ``(B,)`` of feature rows ``(B, D)``."""
        d = np.asarray(features, dtype=np.float64) - self.mean
        # (d P) · d row by row: a BLAS matrix product (einsum's "bi,ij,bj->b" is a naive loop,
        # measured 0.55 s per 256 images, 85 % of a GPU batch's time).
        return np.sqrt(np.maximum(np.sum((d @ self.precision) * d, axis=1), 0.0))

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        return save({"mean": self.mean, "precision": self.precision})

    @classmethod
    def from_bytes(cls, data: bytes) -> GateStats:
        from safetensors.numpy import load

        t = load(data)
        return cls(t["mean"], t["precision"])


def energy(logits: np.ndarray) -> np.ndarray:
    """The energy score ``-logsumexp(logits)`` (Liu et al. 2020): higher is less familiar."""
    return -torch.logsumexp(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()


def threshold_at(scores: np.ndarray, rejection: float) -> float:
    """The smallest score above which at most ``rejection`` of ``scores`` lie."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64), 1 - rejection, method="higher"))


def fit_gate(
    train_features: np.ndarray,
    val_features: np.ndarray,
    val_logits: np.ndarray,
    *,
    rejection: float = VAL_REJECTION,
) -> tuple[Gate, GateStats]:
    """Statistics from the training films, thresholds from the validation films."""
    stats, shrinkage = GateStats.fit(train_features)
    distance, val_energy = stats.score(val_features), energy(val_logits)
    gate = Gate(
        threshold=threshold_at(distance, rejection),
        energy_threshold=threshold_at(val_energy, rejection),
        val_scores={
            "mahalanobis": (float(distance.mean()), float(distance.std())),
            "energy": (float(val_energy.mean()), float(val_energy.std())),
        },
        shrinkage=shrinkage,
        dim=int(train_features.shape[1]),
        fitted_on=f"train ({len(train_features)} images); threshold on val ({len(val_features)})",
        val_rejection=rejection,
    )
    combined = combined_score(gate, distance, val_energy)
    gate = gate.model_copy(update={"combined_threshold": threshold_at(combined, rejection)})
    return gate, stats


def combined_score(gate: Gate, distance: np.ndarray, energies: np.ndarray) -> np.ndarray | None:
    """The Mahalanobis distance and the energy score, each standardised by its mean and
    standard deviation on the validation films, summed (None without ``gate.val_scores``).
    A candidate method, reported by the gate's evaluation beside the two it combines."""
    if not gate.val_scores:
        return None
    (dm, ds), (em, es) = gate.val_scores["mahalanobis"], gate.val_scores["energy"]
    return (np.asarray(distance) - dm) / max(ds, 1e-12) + (np.asarray(energies) - em) / max(
        es, 1e-12
    )


GateField = Field(None, description="the input gate's image layer (None: no gate fitted)")
