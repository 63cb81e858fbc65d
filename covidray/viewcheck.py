"""The input gate's view check: a frontal (PA/AP) chest film, or a lateral one?

The third layer of the gate (metadata → image distance → view check, see
:mod:`covidray.gate`): the image distance refuses CT slices, photographs and other kinds
first, so this two-class check only sees chest films. A class-balanced, L2-regularised
logistic regression on the standardised, spatially pooled features of the model's own
layers (``feature_layers``, :func:`default_view_layers`: ``features.blocks.5`` for
``efficientnet_lite0``, captured in the Predictor's one forward pass), fitted on a view
dataset (``--views``: rows whose ``view`` says lateral or frontal, e.g. the ingested
``../shared/data/views``) plus the frontal films of the training split. The L2 strength is
chosen by cross-validation grouped by patient, and the fitted card records the
cross-validated figures (laterals caught, frontals refused). A film whose probability of
being lateral exceeds ``threshold`` is refused with ``gate_reason`` ``image_view:lateral``
(the DICOM header's own ``view:LL`` and the like come from :func:`covidray.gate.metadata_reason`
before any pixel is read). Parameters live in ``view.safetensors`` in the model directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

VIEW_STATS_NAME = "view.safetensors"
VIEW_LAYERS = ("pool",)  # the head's input: any backbone has it
# By backbone, chosen by bench/view_layers.py (docs/gate.md); also a gate layer there, so the
# one forward pass captures it anyway.
DEFAULT_VIEW_LAYERS: dict[str, tuple[str, ...]] = {"efficientnet_lite0": ("features.blocks.5",)}
LATERAL_REASON = "image_view:lateral"
L2_GRID = (0.01, 0.1, 1.0, 10.0)  # penalty on the mean loss, standardised features
FOLDS = 5
LATERAL_VIEWS = frozenset({"L", "LL", "RL", "LAT", "LATERAL"})


def default_view_layers(backbone: str) -> tuple[str, ...]:
    """The view check's feature layers for ``backbone``."""
    return DEFAULT_VIEW_LAYERS.get(backbone, VIEW_LAYERS)


def view_class(view: Any) -> Literal["lateral", "frontal"] | None:
    """``"lateral"`` / ``"frontal"`` from a manifest's or header's view (``L``, ``LL``,
    ``PA``, ``AP Supine``, ...); None when blank or neither (oblique, decubitus)."""
    text = str(view).strip().upper().replace("_", " ") if view is not None else ""
    if not text or text in ("NAN", "NONE"):
        return None
    if text in LATERAL_VIEWS or text.startswith("LAT"):
        return "lateral"
    if text.split(" ")[0] in ("PA", "AP"):
        return "frontal"
    return None


class ViewCheck(BaseModel):
    """The view check's settings (stored in the model card)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["logistic"] = "logistic"
    feature_layers: tuple[str, ...] = VIEW_LAYERS
    dims: tuple[int, ...]
    l2: float  # chosen by patient-grouped cross-validation
    threshold: float = 0.5  # P(lateral) above this: refused
    fitted_on: str  # e.g. "23 lateral, 528 frontal films of 520 patients"
    # Out-of-fold figures at the chosen l2 (folds by patient): laterals caught and frontal
    # films refused, each as [refused, n], the view set's frontals apart from the others.
    cv: dict[str, tuple[int, int]] = Field(default_factory=dict)
    stats_file: str = VIEW_STATS_NAME
    stats_sha256: str = ""


class ViewWeights:
    """Standardisation and the logistic model: ``P(lateral) = σ(((x - mean) / scale) · coef
    + intercept)``."""

    def __init__(
        self, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: float
    ) -> None:
        self.mean = np.asarray(mean, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = float(intercept)

    def lateral_probability(self, features: np.ndarray) -> np.ndarray:
        """``P(lateral)`` ``(B,)`` of feature rows ``(B, D)`` (the check's layers side by side)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.mean):
            raise ValueError(f"expected features of shape (N, {len(self.mean)}), got {x.shape}")
        z = ((x - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        return save(
            {
                "mean": self.mean,
                "scale": self.scale,
                "coef": self.coef,
                "intercept": np.array([self.intercept]),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ViewWeights:
        from safetensors.numpy import load

        t = load(data)
        return cls(t["mean"], t["scale"], t["coef"], float(t["intercept"][0]))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float) -> ViewWeights:
    """Class-balanced logistic regression of ``y`` (1 = lateral) on the standardised rows of
    ``x`` with an L2 penalty ``l2 / 2 · |coef|²`` on the mean loss (float64 L-BFGS:
    deterministic)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mean, scale = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    xs = torch.as_tensor((x - mean) / scale)
    yt = torch.as_tensor(y)
    n_pos = max(float(y.sum()), 1.0)
    n_neg = max(float(len(y) - y.sum()), 1.0)
    weight = torch.where(yt > 0, len(y) / (2 * n_pos), len(y) / (2 * n_neg))
    coef = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [coef, bias], lr=1.0, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = xs @ coef + bias
        loss = (
            weight * torch.nn.functional.binary_cross_entropy_with_logits(z, yt, reduction="none")
        ).mean() + 0.5 * l2 * (coef**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return ViewWeights(mean, scale, coef.detach().numpy(), float(bias.detach()[0]))


def patient_folds(patients: Sequence[str], lateral: np.ndarray, folds: int = FOLDS) -> np.ndarray:
    """A fold index per row, whole patients per fold: patients with a lateral film are dealt
    round-robin first (each fold gets some), then the others, in a seeded order."""
    lateral = np.asarray(lateral, dtype=bool)
    ids = np.asarray([str(p) for p in patients])
    with_lateral = sorted(set(ids[lateral]))
    others = sorted(set(ids) - set(with_lateral))
    rng = np.random.default_rng(0)
    order = [with_lateral[i] for i in rng.permutation(len(with_lateral))]
    order += [others[i] for i in rng.permutation(len(others))]
    fold_of = {p: i % folds for i, p in enumerate(order)}
    return np.array([fold_of[p] for p in ids])


def _weighted_log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    pos, neg = y > 0, y <= 0
    return float(0.5 * -np.log(p[pos]).mean() + 0.5 * -np.log(1 - p[neg]).mean())


def out_of_fold(x: np.ndarray, y: np.ndarray, folds: np.ndarray, l2: float) -> np.ndarray:
    """Each row's ``P(lateral)`` from a model fitted without its fold (its patients)."""
    p = np.zeros(len(y))
    for f in np.unique(folds):
        held = folds == f
        p[held] = fit_logistic(x[~held], y[~held], l2).lateral_probability(x[held])
    return p


def fit_view_check(
    features: np.ndarray,
    lateral: np.ndarray,
    patients: Sequence[str],
    in_view_set: np.ndarray,
    *,
    layers: tuple[str, ...] = VIEW_LAYERS,
    dims: tuple[int, ...] | None = None,
    threshold: float = 0.5,
) -> tuple[ViewCheck, ViewWeights]:
    """Fit the view check on feature rows ``(N, sum(dims))`` labelled ``lateral`` (bool),
    choosing the L2 strength by patient-grouped cross-validation; ``in_view_set`` marks the
    rows of the view dataset (their frontal films are reported apart)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(lateral, dtype=bool).astype(np.float64)
    in_view_set = np.asarray(in_view_set, dtype=bool)
    dims = dims or (int(x.shape[1]),)
    if y.sum() < FOLDS or (1 - y).sum() < FOLDS:
        raise ValueError(
            f"the view check needs at least {FOLDS} lateral and {FOLDS} frontal films "
            f"(got {int(y.sum())} and {int((1 - y).sum())}): pass --views with lateral films"
        )
    folds = patient_folds(patients, y > 0)
    oof = {l2: out_of_fold(x, y, folds, l2) for l2 in L2_GRID}
    best = min(L2_GRID, key=lambda l2: (_weighted_log_loss(oof[l2], y), -l2))
    refused = oof[best] > threshold
    lat, front = y > 0, y <= 0

    def count(mask: np.ndarray) -> tuple[int, int]:
        return int(refused[mask].sum()), int(mask.sum())

    cv = {
        "laterals_refused": count(lat),
        "view_set_frontals_refused": count(front & in_view_set),
        "other_frontals_refused": count(front & ~in_view_set),
    }
    check = ViewCheck(
        feature_layers=layers,
        dims=dims,
        l2=best,
        threshold=threshold,
        fitted_on=(
            f"{int(lat.sum())} lateral and {int(front.sum())} frontal films of "
            f"{len(set(map(str, patients)))} patients ({int(in_view_set.sum())} from the view set)"
        ),
        cv=cv,
    )
    return check, fit_logistic(x, y, best)


ViewCheckField = Field(None, description="the input gate's view check (None: not fitted)")
