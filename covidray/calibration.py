"""Calibrated probabilities: a temperature (or per-class vector scaling) fitted on held-out
logits, applied to the flip-TTA-averaged logits before the softmax (Guo et al. 2017).

Temperature scaling divides every logit by one ``T > 0``: the predicted class never changes,
only the confidence. Vector scaling (a scale and a bias per class) can fit better but can also
change predictions and overfit a small validation split, so :func:`fit_calibration` keeps it
only when its cross-validated negative log-likelihood beats the temperature's by a clear
margin, and a temperature only when its cross-validated NLL beats leaving the logits alone.
A model directory from before calibration loads with :data:`UNCALIBRATED` (T = 1).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

# Vector scaling must beat temperature scaling's cross-validated NLL by this share to be used.
VECTOR_MARGIN = 0.02


class Calibration(BaseModel):
    """How raw logits become probabilities (stored in the model card)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["temperature", "vector"] = "temperature"
    temperature: float = Field(1.0, gt=0)
    scale: list[float] | None = None  # vector scaling: logits * scale + bias
    bias: list[float] | None = None
    fitted_on: str | None = None  # e.g. "val (107 images)"; None: not fitted
    nll_before: float | None = None  # on what it was fitted on
    nll_after: float | None = None
    cv_nll: dict[str, float] = Field(default_factory=dict)  # method -> cross-validated NLL
    note: str = ""

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated logits (softmax them for probabilities)."""
        if self.method == "vector" and self.scale is not None and self.bias is not None:
            scale = torch.tensor(self.scale, dtype=logits.dtype, device=logits.device)
            bias = torch.tensor(self.bias, dtype=logits.dtype, device=logits.device)
            return logits * scale + bias
        return logits / self.temperature


UNCALIBRATED = Calibration(
    note="model directory from before calibration: temperature 1 (raw softmax)"
)


def nll(logits: np.ndarray, labels: np.ndarray, cal: Calibration) -> float:
    """Mean negative log-likelihood of ``labels`` under calibrated ``logits``."""
    z = cal.apply(torch.as_tensor(logits, dtype=torch.float64))
    return float(torch.nn.functional.cross_entropy(z, torch.as_tensor(np.array(labels)).long()))


def _fit(logits: np.ndarray, labels: np.ndarray, method: str) -> Calibration:
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(np.array(labels)).long()
    k = z.shape[1]
    if method == "temperature":
        params = [torch.zeros(1, dtype=torch.float64, requires_grad=True)]  # log T

        def calibrated() -> torch.Tensor:
            return z / params[0].exp()
    else:
        params = [
            torch.zeros(k, dtype=torch.float64, requires_grad=True),  # log scale
            torch.zeros(k, dtype=torch.float64, requires_grad=True),  # bias
        ]

        def calibrated() -> torch.Tensor:
            return z * params[0].exp() + params[1]

    opt = torch.optim.LBFGS(params, lr=0.1, max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(calibrated(), y)
        loss.backward()
        return loss

    opt.step(closure)
    if method == "temperature":
        return Calibration(temperature=float(params[0].detach().exp()))
    return Calibration(
        method="vector", scale=params[0].exp().tolist(), bias=params[1].detach().tolist()
    )


def _cv_nll(logits: np.ndarray, labels: np.ndarray, method: str, folds: int, seed: int) -> float:
    order = np.random.default_rng(seed).permutation(len(labels))
    losses, weights = [], []
    for part in np.array_split(order, folds):
        rest = np.setdiff1d(order, part)
        cal = _fit(logits[rest], labels[rest], method)
        losses.append(nll(logits[part], labels[part], cal))
        weights.append(len(part))
    return float(np.average(losses, weights=weights))


def fit_calibration(
    logits: np.ndarray, labels: np.ndarray, *, fitted_on: str, folds: int = 5, seed: int = 0
) -> Calibration:
    """Fit a temperature on ``(logits, labels)``; use per-class vector scaling instead only
    when its ``folds``-fold cross-validated NLL is at least :data:`VECTOR_MARGIN` better, and
    neither (T = 1) when the temperature's cross-validated NLL does not beat the raw logits'
    (a parameter-free NLL: held out by construction)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    raw = nll(logits, labels, Calibration())
    cv = {}
    if len(labels) >= 2 * folds:
        cv = {m: _cv_nll(logits, labels, m, folds, seed) for m in ("temperature", "vector")}
        cv["none"] = raw
    method = "temperature"
    if cv and cv["vector"] < min((1 - VECTOR_MARGIN) * cv["temperature"], raw):
        method = "vector"
    cal = _fit(logits, labels, method)
    note = ""
    if method == "temperature" and cv and cv["temperature"] >= raw:
        note = (
            f"a fitted temperature (T = {cal.temperature:.3f}) did not beat T = 1 in "
            f"{folds}-fold cross-validation: kept T = 1"
        )
        cal = Calibration()
    return cal.model_copy(
        update={
            "fitted_on": fitted_on,
            "nll_before": raw,
            "nll_after": nll(logits, labels, cal),
            "cv_nll": cv,
            "note": note,
        }
    )
