"""What a trained classifier gets fitted after its weights are fixed: the calibration (on the
validation split) and the input gate (statistics from the training split, thresholds from the
validation split). Training runs this at its end; ``covidray calibrate`` runs it on an existing
model directory (a site's own data, or a model from before these existed)."""

from __future__ import annotations

import logging
from typing import NamedTuple

import pandas as pd
import torch

from .calibration import Calibration, fit_calibration
from .dataset import load_images, load_rows
from .evaluation.artifacts import reliability_png
from .evaluation.metrics import EvalReport
from .gate import FEATURE_LAYER, GateStats, fit_gate
from .modeldir import ModelCard, load_model_dir, save_model_dir
from .predict import BatchPrediction, Predictor
from .preprocess import contrast_method

log = logging.getLogger(__name__)


class Fitted(NamedTuple):
    card: ModelCard  # with calibration and gate
    gate_stats: bytes  # GateStats.to_bytes(), for gate.safetensors
    reliability: bytes  # reliability diagram (val, before and after), PNG


def raw_outputs(
    model: torch.nn.Module,
    card: ModelCard,
    rows: pd.DataFrame,
    *,
    gate_layers: tuple[str, ...],
    device: str | torch.device | None = None,
    batch_size: int = 64,
) -> BatchPrediction:
    """Uncalibrated, ungated outputs (flip-averaged logits, ``gate_layers``' pooled features)
    for ``rows``."""
    bare = card.model_copy(update={"calibration": None, "gate": None})
    predictor = Predictor(model, bare, device=device, gate_layers=gate_layers)
    prep = card.preprocessing
    images = load_images(
        list(rows["uri"]),
        prep.input_size,
        shorter_side=prep.shorter_side,
        contrast=contrast_method(prep.contrast),
    )
    return predictor.predict_many(images, batch_size, with_cam=False, return_features=True)


def fit_outputs(
    model: torch.nn.Module,
    card: ModelCard,
    rows: pd.DataFrame,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    gate_layers: tuple[str, ...] | None = None,
) -> Fitted:
    """Fit the calibration on ``rows``' val split and the gate on its train (statistics) and
    val (thresholds) splits; ``rows`` from :func:`covidray.dataset.load_rows`. The gate looks
    at ``gate_layers`` (default: the head's input, ``pool``)."""
    layers = tuple(gate_layers or (FEATURE_LAYER,))
    split = {s: rows[rows["split"] == s].reset_index(drop=True) for s in ("train", "val")}
    if split["val"].empty or split["train"].empty:
        raise ValueError("calibration and the input gate need labelled train and val rows")
    real_train = split["train"][~split["train"]["synthetic"].fillna(False).astype(bool)]
    run = {"gate_layers": layers, "device": device, "batch_size": batch_size}
    val = raw_outputs(model, card, split["val"], **run)
    train = raw_outputs(model, card, real_train, **run)
    labels = split["val"]["y"].to_numpy()
    calibration: Calibration = fit_calibration(
        val.logits, labels, fitted_on=f"val ({len(labels)} images)"
    )
    gate, stats = fit_gate(
        train.features,
        val.features,
        layers=layers,
        dims=train.feature_dims,
    )
    before = torch.as_tensor(val.logits).softmax(1).numpy()
    after = calibration.apply(torch.as_tensor(val.logits)).softmax(1).numpy()
    log.info(
        "calibration %s (T = %.3f), gate threshold %.2f over %s",
        calibration.method,
        calibration.temperature,
        gate.threshold,
        ", ".join(layers),
    )
    png = reliability_png(
        before, after, labels, title=f"{card.backbone}: validation split ({len(labels)} films)"
    )
    fitted = card.model_copy(update={"calibration": calibration, "gate": gate})
    return Fitted(fitted, stats.to_bytes(), png)


def calibrate_model_dir(
    model_uri: str,
    data_uri: str,
    out_uri: str | None = None,
    *,
    device: str | None = None,
    batch_size: int = 64,
    gate_layers: tuple[str, ...] | None = None,
) -> tuple[ModelCard, dict[str, EvalReport]]:
    """Fit calibration and gate for an existing model directory on ``data_uri``'s train/val
    splits, evaluate val and test with them, and write the directory to ``out_uri`` (default:
    in place; the weights and ``model_version`` stay, ``scoring_version`` changes)."""
    from .evaluation.evaluate import evaluate_val_test
    from .heldout import held_out_sources
    from .preprocess import check_card

    model, card = load_model_dir(model_uri)
    check_card(card.preprocessing)
    rows = load_rows(data_uri)
    fitted = fit_outputs(
        model, card, rows, device=device, batch_size=batch_size, gate_layers=gate_layers
    )
    predictor = Predictor(
        model, fitted.card, device=device, gate_stats=GateStats.from_bytes(fitted.gate_stats)
    )
    reports = evaluate_val_test(
        predictor, rows, batch_size=batch_size, held_out=held_out_sources(data_uri)
    )
    saved = save_model_dir(
        model,
        fitted.card,
        out_uri or model_uri,
        reports,
        gate_stats=fitted.gate_stats,
        reliability_png=fitted.reliability,
    )
    return saved, reports
