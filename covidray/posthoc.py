"""What a trained classifier gets fitted after its weights are fixed: the calibration (on the
validation split), the input gate (statistics from the training split, thresholds from the
validation split), its view check (a view dataset's lateral and frontal films plus the
training split's frontal films; only with ``views``) and the fixed Grad-CAM scale of the
COVID-19 class (the validation split). Training (fine-tuning included) runs this at its end;
``covidray calibrate`` runs it on an existing model directory (a site's own data, or a model
from before these existed)."""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from .calibration import Calibration, fit_calibration
from .dataset import load_images, load_rows, load_view_rows
from .evaluation.artifacts import reliability_png
from .evaluation.metrics import EvalReport
from .explain.fixed import fit_cam_scale
from .gate import GateStats, default_gate_layers, fit_gate
from .labels import CLASSES
from .modeldir import ModelCard, load_model_dir, read_view_stats, save_model_dir
from .predict import BatchPrediction, Predictor, select_layers
from .preprocess import contrast_method
from .viewcheck import ViewWeights, default_view_layers, fit_view_check, view_class

log = logging.getLogger(__name__)


class Fitted(NamedTuple):
    card: ModelCard  # with calibration, gate, CAM scale (and view check, given views)
    gate_stats: bytes  # GateStats.to_bytes(), for gate.safetensors
    reliability: bytes  # reliability diagram (val, before and after), PNG
    view_stats: bytes | None = None  # ViewWeights.to_bytes(), for view.safetensors

    def predictor(self, model: torch.nn.Module, device: str | torch.device | None) -> Predictor:
        """The Predictor that ships with these: calibrated, gated, with the view check."""
        return Predictor(
            model,
            self.card,
            device=device,
            gate_stats=GateStats.from_bytes(self.gate_stats),
            view_weights=ViewWeights.from_bytes(self.view_stats) if self.view_stats else None,
        )


def raw_outputs(
    model: torch.nn.Module,
    card: ModelCard,
    rows: pd.DataFrame,
    *,
    gate_layers: tuple[str, ...],
    device: str | torch.device | None = None,
    batch_size: int = 64,
    images: torch.Tensor | None = None,
) -> BatchPrediction:
    """Uncalibrated, ungated outputs (flip-averaged logits, ``gate_layers``' pooled features)
    for ``rows`` (``images``: theirs, decoded already)."""
    bare = card.model_copy(update={"calibration": None, "gate": None, "view_check": None})
    predictor = Predictor(model, bare, device=device, gate_layers=gate_layers)
    if images is None:
        images = row_images(card, rows)
    return predictor.predict_many(images, batch_size, with_cam=False, return_features=True)


def row_images(card: ModelCard, rows: pd.DataFrame) -> torch.Tensor:
    """``rows``' images decoded once with the card's preprocessing (``N×1×S×S`` uint8)."""
    prep = card.preprocessing
    return load_images(
        list(rows["uri"]),
        prep.input_size,
        shorter_side=prep.shorter_side,
        contrast=contrast_method(prep.contrast),
    )


def view_training_set(
    train_rows: pd.DataFrame,
    train_features: np.ndarray,
    view_rows: pd.DataFrame,
    view_features: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """The view check's rows: the view dataset's films with a lateral or frontal ``view``
    (those that are also training films counted once, as training films), then the training
    split's films (frontal unless their ``view`` says lateral). Returns features, lateral
    (bool), patient ids and whether each row is the view dataset's."""
    classes = [view_class(v) for v in view_rows["view"]]
    keep = np.array(
        [
            c is not None and i not in set(train_rows["image_id"])
            for c, i in zip(classes, view_rows["image_id"], strict=True)
        ],
        dtype=bool,
    )
    lateral_views = np.array([c == "lateral" for c in classes], dtype=bool)[keep]
    lateral_train = np.array([view_class(v) == "lateral" for v in train_rows["view"]], dtype=bool)
    features = np.concatenate([view_features[keep], train_features])
    lateral = np.concatenate([lateral_views, lateral_train])
    patients = [str(p) for p in view_rows["patient_id"][keep]] + [
        str(p) for p in train_rows["patient_id"]
    ]
    in_view_set = np.r_[np.ones(int(keep.sum()), bool), np.zeros(len(train_rows), bool)]
    return features, lateral, patients, in_view_set


def fit_outputs(
    model: torch.nn.Module,
    card: ModelCard,
    rows: pd.DataFrame,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    gate_layers: tuple[str, ...] | None = None,
    view_rows: pd.DataFrame | None = None,
) -> Fitted:
    """Fit the calibration on ``rows``' val split, the gate on its train (statistics) and
    val (thresholds) splits and the COVID-19 Grad-CAM scale on val; ``rows`` from
    :func:`covidray.dataset.load_rows`. The gate looks at ``gate_layers`` (default: the
    backbone's, :func:`covidray.gate.default_gate_layers`). With ``view_rows``
    (:func:`covidray.dataset.load_view_rows`) the view check too, on them and the training
    split's frontal films."""
    layers = tuple(gate_layers or default_gate_layers(card.backbone))
    with_views = view_rows is not None and not view_rows.empty
    view_layers = default_view_layers(card.backbone) if with_views else ()
    captured = layers + tuple(n for n in view_layers if n not in layers)
    split = {s: rows[rows["split"] == s].reset_index(drop=True) for s in ("train", "val")}
    if split["val"].empty or split["train"].empty:
        raise ValueError("calibration and the input gate need labelled train and val rows")
    real_train = split["train"][~split["train"]["synthetic"].fillna(False).astype(bool)]
    real_train = real_train.reset_index(drop=True)
    run = {"gate_layers": captured, "device": device, "batch_size": batch_size}
    val_images = row_images(card, split["val"])
    val = raw_outputs(model, card, split["val"], images=val_images, **run)
    train = raw_outputs(model, card, real_train, **run)
    labels = split["val"]["y"].to_numpy()
    calibration: Calibration = fit_calibration(
        val.logits, labels, fitted_on=f"val ({len(labels)} images)"
    )
    dims = dict(zip(captured, train.feature_dims or (), strict=True))
    gate, stats = fit_gate(
        select_layers(train.features, captured, train.feature_dims, layers),
        select_layers(val.features, captured, val.feature_dims, layers),
        layers=layers,
        dims=tuple(dims[n] for n in layers),
    )
    view_check = view_stats = None
    if with_views:
        part = view_layers
        seen = raw_outputs(model, card, view_rows, **run)
        x, lateral, patients, in_view_set = view_training_set(
            real_train,
            select_layers(train.features, captured, train.feature_dims, part),
            view_rows,
            select_layers(seen.features, captured, seen.feature_dims, part),
        )
        view_check, weights = fit_view_check(
            x,
            lateral,
            patients,
            in_view_set,
            layers=view_layers,
            dims=tuple(dims[n] for n in view_layers),
        )
        view_stats = weights.to_bytes()
        log.info("view check: %s; cross-validated %s", view_check.fitted_on, view_check.cv)
    covid = CLASSES.index("covid")
    cam_scale = fit_cam_scale(model, val_images, covid)
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
    fitted = card.model_copy(
        update={
            "calibration": calibration,
            "gate": gate,
            "view_check": view_check,
            "cam_covid_scale": cam_scale,
        }
    )
    return Fitted(fitted, stats.to_bytes(), png, view_stats)


def calibrate_model_dir(
    model_uri: str,
    data_uri: str,
    out_uri: str | None = None,
    *,
    device: str | None = None,
    batch_size: int = 64,
    gate_layers: tuple[str, ...] | None = None,
    views_uri: str | None = None,
) -> tuple[ModelCard, dict[str, EvalReport]]:
    """Fit calibration, gate and CAM scale for an existing model directory on ``data_uri``'s
    train/val splits (and the view check, with ``views_uri``: without it, a view check the
    directory has stays, the weights being the same), evaluate val and test with them, and
    write the directory to ``out_uri`` (default: in place; the weights and ``model_version``
    stay, ``scoring_version`` changes)."""
    from .evaluation.evaluate import evaluate_val_test
    from .heldout import held_out_sources
    from .preprocess import check_card

    model, card = load_model_dir(model_uri)
    check_card(card.preprocessing)
    rows = load_rows(data_uri)
    fitted = fit_outputs(
        model,
        card,
        rows,
        device=device,
        batch_size=batch_size,
        gate_layers=gate_layers,
        view_rows=load_view_rows(views_uri) if views_uri else None,
    )
    if fitted.view_stats is None and card.view_check is not None:  # same weights: it stays
        fitted = fitted._replace(
            card=fitted.card.model_copy(update={"view_check": card.view_check}),
            view_stats=read_view_stats(model_uri, card),
        )
    predictor = fitted.predictor(model, device)
    reports = evaluate_val_test(
        predictor, rows, batch_size=batch_size, held_out=held_out_sources(data_uri)
    )
    saved = save_model_dir(
        model,
        fitted.card,
        out_uri or model_uri,
        reports,
        gate_stats=fitted.gate_stats,
        view_stats=fitted.view_stats,
        reliability_png=fitted.reliability,
    )
    return saved, reports
