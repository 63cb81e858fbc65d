"""Running a model on a dataset split (``covidray evaluate``, training's final evaluation):
decode once, the Predictor (the one inference path: flip TTA, calibration, input gate),
metrics with subgroups, calibration and gate figures."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..dataset import GROUP_COLUMNS, load_images, load_rows
from ..drift import OutputMix
from ..heldout import held_out_sources
from ..predict import Predictor
from ..preprocess import check_card, contrast_method
from .config import EVAL_SPLITS
from .external import Threshold, fit_threshold, separation_figures
from .intervals import bootstrap, wilson
from .metrics import (
    POSITIVE_CLASS,
    EvalReport,
    OutputFigures,
    ece_if_calibrated,
    evaluate_predictions,
    expected_calibration_error,
)


def select_split(rows: pd.DataFrame, split: str) -> pd.DataFrame:
    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {EVAL_SPLITS}")
    chosen = rows if split == "all" else rows[rows["split"] == split]
    if chosen.empty:
        raise ValueError(f"no labelled rows in split {split!r}")
    return chosen.reset_index(drop=True)


def predict_rows(predictor: Predictor, rows: pd.DataFrame, *, batch_size: int = 64) -> Any:
    """The predictor's outputs (calibrated probabilities, raw logits, gate verdicts) for
    ``rows`` (from :func:`load_rows`), decoded once with the card's preprocessing."""
    prep = predictor.card.preprocessing
    images = load_images(
        list(rows["uri"]),
        prep.input_size,
        shorter_side=prep.shorter_side,
        contrast=contrast_method(prep.contrast),
    )
    return predictor.predict_many(images, batch_size, with_cam=False)


def output_figures(
    res: Any, labels: np.ndarray, predictor: Predictor, groups: pd.DataFrame | None = None
) -> OutputFigures:
    """Calibration before and after (bootstrap intervals) and the gate's false rejections,
    overall and by true class and each of ``groups``' columns (same row order)."""
    raw = torch.as_tensor(res.logits).softmax(1).numpy()
    rejected = int((~res.in_scope).sum())
    n = len(labels)
    cal = predictor.calibration
    gated = predictor.gate is not None or predictor.view is not None
    reasons = Counter(r for r in res.gate_reason if r)
    return OutputFigures(
        calibration={"method": cal.method, "temperature": cal.temperature, "note": cal.note},
        ece_interval=bootstrap(expected_calibration_error, res.probs, labels),
        ece_if_calibrated=ece_if_calibrated(res.probs),
        ece_uncalibrated=expected_calibration_error(raw, labels),
        ece_uncalibrated_interval=bootstrap(expected_calibration_error, raw, labels),
        labels_changed_by_calibration=int((raw.argmax(1) != res.probs.argmax(1)).sum()),
        false_rejection_rate=rejected / n if gated else None,
        false_rejection_interval=wilson(rejected, n) if gated else None,
        n_rejected=rejected,
        false_rejections_by=_rejections_by(~res.in_scope, labels, predictor.classes, groups)
        if gated
        else {},
        rejections_by_reason=dict(sorted(reasons.items())),
        answers=OutputMix.of(res.labels, res.gate_reason),
    )


def _rejections_by(
    refused: np.ndarray, labels: np.ndarray, classes: Sequence[str], groups: pd.DataFrame | None
) -> dict[str, dict[str, tuple[int, int]]]:
    columns = {"label": pd.Series([classes[int(y)] for y in labels])}
    if groups is not None:
        columns.update({c: groups[c].reset_index(drop=True) for c in groups.columns})
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for name, column in columns.items():
        values = column.fillna("unknown").astype(str).to_numpy()
        out[name] = {
            v: (int(refused[values == v].sum()), int((values == v).sum()))
            for v in sorted(set(values))
        }
    return out


def evaluate_rows(
    predictor: Predictor,
    rows: pd.DataFrame,
    *,
    batch_size: int = 64,
    threshold: Threshold | None = None,
    held_out: Sequence[str] = (),
) -> EvalReport:
    """Predict ``rows`` and score them with subgroup breakdowns, calibration and gate figures,
    and the COVID-19 vs adult non-COVID figures (:mod:`.external`) at ``threshold`` (None:
    fitted on these rows when they are val rows) and for the ``held_out`` sources."""
    res = predict_rows(predictor, rows, batch_size=batch_size)
    labels = rows["y"].to_numpy()
    groups = rows[[c for c in GROUP_COLUMNS if c in rows.columns]].reset_index(drop=True)
    report = evaluate_predictions(res.probs, labels, groups)
    outputs = output_figures(res, labels, predictor, groups)
    covid = list(predictor.classes).index(POSITIVE_CLASS)
    if threshold is None:
        threshold = (
            _fit_threshold(res.probs, labels, rows, covid)
            if set(rows["split"]) == {"val"}
            else Threshold(value=None)
        )
    figures = separation_figures(
        res.probs,
        labels,
        rows,
        threshold,
        covid_index=covid,
        refused=None if predictor.gate is None else ~res.in_scope,
        held_out_sources=held_out,
    )
    return report.model_copy(update={"outputs": outputs, "separation": figures})


def _fit_threshold(
    probs: np.ndarray, labels: np.ndarray, rows: pd.DataFrame, covid: int
) -> Threshold:
    adult = rows["age_group"].astype(str).str.lower().to_numpy() == "adult"
    return fit_threshold(np.asarray(probs)[:, covid], labels == covid, adult)


def evaluate_val_test(
    predictor: Predictor,
    rows: pd.DataFrame,
    *,
    batch_size: int = 64,
    held_out: Sequence[str] = (),
) -> dict[str, EvalReport]:
    """:func:`evaluate_rows` on the val and the test rows of ``rows`` (those it has), the
    operating point fitted on val and applied to test."""
    reports: dict[str, EvalReport] = {}
    threshold = None
    for split in ("val", "test"):
        part = rows[rows["split"] == split].reset_index(drop=True)
        if not part.empty:
            reports[split] = evaluate_rows(
                predictor, part, batch_size=batch_size, threshold=threshold, held_out=held_out
            )
            threshold = reports[split].separation.threshold
    return reports


def val_threshold(predictor: Predictor, rows: pd.DataFrame, *, batch_size: int = 64) -> Threshold:
    """The 90 % specificity operating point on the val rows of ``rows`` (:mod:`.external`)."""
    val = rows[rows["split"] == "val"].reset_index(drop=True)
    if val.empty:
        return Threshold(value=None)
    res = predict_rows(predictor, val, batch_size=batch_size)
    covid = list(predictor.classes).index(POSITIVE_CLASS)
    return _fit_threshold(res.probs, val["y"].to_numpy(), val, covid)


def evaluate_model(
    model_uri: str,
    data_uri: str,
    split: str = "test",
    *,
    batch_size: int = 64,
    device: str | None = None,
) -> EvalReport:
    """Score the model directory ``model_uri`` on ``split`` of ``data_uri`` through its
    Predictor: the card's preprocessing (a dataset ingested at another shorter side is
    re-normalised), flip TTA, calibration and input gate, as the nightly job and the endpoint
    apply them. The operating point is fitted on val (predicted too when ``split`` is not
    val); a source-held-out dataset's held-out sources get figures of their own."""
    predictor = Predictor.from_dir(model_uri, device=device)
    check_card(predictor.card.preprocessing)
    every = load_rows(data_uri)
    rows = select_split(every, split)
    threshold = None if split == "val" else val_threshold(predictor, every, batch_size=batch_size)
    return evaluate_rows(
        predictor,
        rows,
        batch_size=batch_size,
        threshold=threshold,
        held_out=held_out_sources(data_uri),
    )
