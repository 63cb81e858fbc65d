"""Evaluation metrics: confusion matrix, per-class scores, calibration and subgroup breakdowns.

Why subgroups are mandatory: in the public COVID chest X-ray collections the classes differ by
source and by age (COVID images come from a few hospitals and papers, pneumonia images largely
from a paediatric cohort, normals from yet other archives). A model can score well by learning
the source, the age or the view rather than the disease (DeGrave et al., "AI for radiographic
COVID-19 detection selects shortcuts over signal", Nature Machine Intelligence 2021). So every
evaluation here breaks its metrics down by source, age group and view, flags subgroups whose
COVID sensitivity or specificity falls well below the overall figure, and reports adult-only
figures separately: accuracy on a confounded split is never reported alone.

Every rate (a count over a count: accuracy, precision, recall, sensitivity, specificity) comes
with its Wilson 95 % interval, and a subgroup is flagged on a rate only when that rate's own
denominator (its COVID images for sensitivity, its non-COVID images for specificity) holds at
least ``flag_min_n`` cases: a subgroup of 30 images with 3 COVID-19 cases says little about
sensitivity. F1, macro-F1 and ECE are not proportions of a count and get no interval.

Everything is a pure function over arrays and DataFrames; no model code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from pydantic import BaseModel

from ..drift import OutputMix
from ..labels import CLASSES
from .external import SeparationFigures

POSITIVE_CLASS = "covid"
UNKNOWN = "unknown"
DEFAULT_SUBGROUP_COLUMNS: tuple[str, ...] = ("source", "age_group", "view")
Z_95 = 1.959963984540054  # two-sided 95 % normal quantile

Interval = tuple[float, float]


def wilson_interval(k: int, n: int, z: float = Z_95) -> Interval | None:
    """Wilson score interval of the proportion ``k / n`` (None for ``n == 0``)."""
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


# ----------------------------------------------------------------------------- models


class ClassMetrics(BaseModel):
    """One-vs-rest scores of one class."""

    precision: float
    recall: float
    f1: float
    support: int
    precision_ci: Interval | None = None  # Wilson 95 %; None: nothing predicted as the class
    recall_ci: Interval | None = None  # None: no image of the class


class SubgroupMetrics(BaseModel):
    """Figures for the images of one subgroup; None where a figure is undefined. Each rate's
    denominator is given (``n``, ``n_covid``, ``n_non_covid``) with its Wilson 95 % interval."""

    n: int
    accuracy: float
    covid_recall: float | None  # None: no covid images in the group
    covid_specificity: float | None  # None: no non-covid images in the group
    n_covid: int = 0  # the sensitivity's denominator
    n_non_covid: int = 0  # the specificity's denominator
    accuracy_ci: Interval | None = None
    covid_recall_ci: Interval | None = None
    covid_specificity_ci: Interval | None = None
    flagged: bool = False
    flag_reason: str | None = None

    def compact(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "accuracy_ci": _ci_json(self.accuracy_ci),
            "n_covid": self.n_covid,
            "covid_recall": self.covid_recall,
            "covid_recall_ci": _ci_json(self.covid_recall_ci),
            "n_non_covid": self.n_non_covid,
            "covid_specificity": self.covid_specificity,
            "covid_specificity_ci": _ci_json(self.covid_specificity_ci),
        }


def _ci_json(ci: Interval | None) -> list[float] | None:
    return None if ci is None else [float(ci[0]), float(ci[1])]


class OutputFigures(BaseModel):
    """How trustworthy the outputs are: calibration (``ece`` in the report is after it) and
    the input gate on films that are all in scope (every refusal is a false rejection)."""

    calibration: dict[str, Any]  # method, temperature (the card's)
    ece_interval: tuple[float, float] | None  # bootstrap 95 %
    # ECE of a perfectly calibrated model with these predictions on as many films (median,
    # 95th percentile): the estimator's own floor (ece_if_calibrated)
    ece_if_calibrated: tuple[float, float] | None = None
    ece_uncalibrated: float  # the same predictions before calibration
    ece_uncalibrated_interval: tuple[float, float] | None
    labels_changed_by_calibration: int
    false_rejection_rate: float | None  # None: no gate fitted
    false_rejection_interval: tuple[float, float] | None  # Wilson 95 %
    n_rejected: int
    # The gate's refusals by subgroup: column (label, source, age group, view) -> value ->
    # (refused, films). Refusals that fall on one class or one source are a bias like any other.
    false_rejections_by: dict[str, dict[str, tuple[int, int]]] = {}
    # The answers: refusals by reason, predicted classes (a model card's drift reference).
    answers: OutputMix | None = None
    # Refusals by gate_reason (ood_image: the image distance; image_view:lateral: the view check)
    rejections_by_reason: dict[str, int] = {}


class EvalReport(BaseModel):
    """Everything an evaluation reports. Overall figures plus the mandatory breakdowns."""

    n: int
    accuracy: float
    macro_f1: float
    per_class: dict[str, ClassMetrics]
    covid_recall: float  # 0.0 when there are no covid images (zero-division convention)
    covid_specificity: float  # 0.0 when there are no non-covid images
    ece: float
    n_covid: int = 0  # COVID sensitivity's denominator
    n_non_covid: int = 0  # COVID specificity's denominator
    accuracy_ci: Interval | None = None  # Wilson 95 % intervals of the rates
    covid_recall_ci: Interval | None = None
    covid_specificity_ci: Interval | None = None
    confusion: list[list[int]]  # rows true, columns predicted, in `classes` order
    classes: list[str]
    subgroups: dict[str, dict[str, SubgroupMetrics]]  # column -> value -> metrics
    flagged: list[str]  # human-readable lines, one per flagged subgroup
    adult: SubgroupMetrics | None  # age_group == 'adult' only; None without such rows
    outputs: OutputFigures | None = None  # calibration and input gate, when a model was run
    # COVID-19 vs adult non-COVID: AUROC, operating point, held-out sources (.external)
    separation: SeparationFigures | None = None

    def to_json(self) -> dict[str, Any]:
        """A compact, JSON-serialisable summary (plain Python numbers, lists and dicts)."""
        return {
            "n": self.n,
            "classes": list(self.classes),
            "accuracy": self.accuracy,
            "accuracy_ci": _ci_json(self.accuracy_ci),
            "macro_f1": self.macro_f1,
            "per_class": {
                name: {
                    **m.model_dump(exclude={"precision_ci", "recall_ci"}),
                    "precision_ci": _ci_json(m.precision_ci),
                    "recall_ci": _ci_json(m.recall_ci),
                }
                for name, m in self.per_class.items()
            },
            "n_covid": self.n_covid,
            "covid_recall": self.covid_recall,
            "covid_recall_ci": _ci_json(self.covid_recall_ci),
            "n_non_covid": self.n_non_covid,
            "covid_specificity": self.covid_specificity,
            "covid_specificity_ci": _ci_json(self.covid_specificity_ci),
            "ece": self.ece,
            "confusion": [list(row) for row in self.confusion],
            "subgroups": {
                column: {value: m.compact() for value, m in values.items()}
                for column, values in self.subgroups.items()
            },
            "flagged": list(self.flagged),
            "adult": self.adult.compact() if self.adult is not None else None,
            **(self.outputs.model_dump(mode="json") if self.outputs is not None else {}),
            **(
                {"separation": self.separation.model_dump(mode="json")}
                if self.separation is not None
                else {}
            ),
        }


# ----------------------------------------------------------------------------- validation


def _labels(y: Any, num_classes: int, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must hold integer class indices")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got {arr.min()}..{arr.max()}")
    return arr


def _probs(probs: Any) -> np.ndarray:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, C), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("probs must be finite")
    if arr.size and (arr.min() < -1e-6 or arr.max() > 1 + 1e-6):
        raise ValueError("probs must be probabilities in [0, 1] (apply softmax to logits)")
    return arr


# ----------------------------------------------------------------------------- metrics


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int = 3) -> np.ndarray:
    """Counts (num_classes, num_classes), int64; rows are the true class, columns predicted."""
    t = _labels(y_true, num_classes, "y_true")
    p = _labels(y_pred, num_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def expected_calibration_error(probs: Any, y_true: Any, n_bins: int = 15) -> float:
    """ECE of the top-class confidence: sum over bins of (n_b / N) * |acc_b - conf_b|.

    Equal-width bins (0, 1/n], (1/n, 2/n], ..., ((n-1)/n, 1]; a confidence of exactly 1.0 falls in
    the last bin and one of 0 in the first. Returns 0.0 for no samples.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    p = _probs(probs)
    t = _labels(y_true, p.shape[1], "y_true")
    if t.shape[0] != p.shape[0]:
        raise ValueError(f"probs and y_true differ in length: {p.shape[0]} vs {t.shape[0]}")
    if p.shape[0] == 0:
        return 0.0
    conf = np.clip(p.max(axis=1), 0.0, 1.0)
    correct = (p.argmax(axis=1) == t).astype(np.float64)
    edges = np.arange(n_bins + 1) / n_bins  # each edge the correctly rounded k / n_bins
    # right=True: index i such that edges[i-1] < conf <= edges[i]; 0 maps to 0 -> first bin.
    bins = np.clip(np.digitize(conf, edges, right=True) - 1, 0, n_bins - 1)
    n = float(p.shape[0])
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        count = int(mask.sum())
        if count:
            ece += (count / n) * abs(float(correct[mask].mean()) - float(conf[mask].mean()))
    return float(ece)


def ece_if_calibrated(
    probs: Any, n_bins: int = 15, n_sim: int = 1000, seed: int = 0
) -> tuple[float, float] | None:
    """The ECE a perfectly calibrated model with exactly these predictions shows on as many
    films: median and 95th percentile over ``n_sim`` label sets drawn from its own
    probabilities (a consistency range; Bröcker & Smith 2007). Binned ECE is biased upwards
    on few films, so an observed ECE inside this range cannot tell the model from a calibrated
    one. None for no films."""
    p = _probs(probs)
    if p.shape[0] == 0:
        return None
    rng = np.random.default_rng(seed)
    cum = np.cumsum(p, axis=1)
    sims = [
        expected_calibration_error(
            p, np.minimum((rng.random((len(p), 1)) > cum).sum(1), p.shape[1] - 1), n_bins
        )
        for _ in range(n_sim)
    ]
    return float(np.median(sims)), float(np.quantile(sims, 0.95))


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def per_class_metrics(cm: np.ndarray, classes: Sequence[str]) -> dict[str, ClassMetrics]:
    """One-vs-rest precision, recall, F1 and support per class; zero division gives 0.0."""
    out: dict[str, ClassMetrics] = {}
    for i, name in enumerate(classes):
        tp = int(cm[i, i])
        predicted = int(cm[:, i].sum())
        support = int(cm[i, :].sum())
        precision = _safe_div(tp, predicted)
        recall = _safe_div(tp, support)
        f1 = _safe_div(2 * precision * recall, precision + recall)
        out[name] = ClassMetrics(
            precision=precision,
            recall=recall,
            f1=f1,
            support=support,
            precision_ci=wilson_interval(tp, predicted),
            recall_ci=wilson_interval(tp, support),
        )
    return out


class _Rate(NamedTuple):
    """``k`` of ``n``: the value (None for ``n == 0``) and its Wilson 95 % interval."""

    k: int
    n: int

    @property
    def value(self) -> float | None:
        return self.k / self.n if self.n else None

    @property
    def ci(self) -> Interval | None:
        return wilson_interval(self.k, self.n)


def _covid_rates(y_true: np.ndarray, y_pred: np.ndarray, pos: int) -> tuple[_Rate, _Rate]:
    """(sensitivity, specificity) with `pos` as the positive class, as counts."""
    is_pos = y_true == pos
    said_pos = y_pred == pos
    sens = _Rate(int((is_pos & said_pos).sum()), int(is_pos.sum()))
    spec = _Rate(int((~is_pos & ~said_pos).sum()), int((~is_pos).sum()))
    return sens, spec


def _subgroup(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    pos: int,
    overall: tuple[float | None, float | None],
    flag_min_n: int,
    flag_margin: float,
) -> SubgroupMetrics:
    n = int(y_true.shape[0])
    correct = int((y_true == y_pred).sum())
    sens, spec = _covid_rates(y_true, y_pred, pos)
    reasons: list[str] = []
    for label, rate, ref in (
        ("COVID sensitivity", sens, overall[0]),
        ("COVID specificity", spec, overall[1]),
    ):
        # A flag needs flag_min_n cases in the rate's own denominator, not in the subgroup.
        value = rate.value
        if rate.n < flag_min_n or value is None or ref is None:
            continue
        if ref - value > flag_margin + 1e-12:
            ci = rate.ci
            reasons.append(
                f"{label} {value:.2f} ({rate.k}/{rate.n}, 95% CI {ci[0]:.2f}–{ci[1]:.2f}) "
                f"vs {ref:.2f} overall"
            )
    return SubgroupMetrics(
        n=n,
        accuracy=correct / n if n else 0.0,
        covid_recall=sens.value,
        covid_specificity=spec.value,
        n_covid=sens.n,
        n_non_covid=spec.n,
        accuracy_ci=wilson_interval(correct, n),
        covid_recall_ci=sens.ci,
        covid_specificity_ci=spec.ci,
        flagged=bool(reasons),
        flag_reason="; ".join(reasons) or None,
    )


def _group_values(column: pd.Series) -> np.ndarray:
    """Column values as strings, with missing/None/NaN/blank mapped to 'unknown'."""
    out = []
    for v in column.tolist():
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA or v is pd.NaT:
            out.append(UNKNOWN)
            continue
        s = str(v).strip()
        out.append(s if s and s.lower() not in ("nan", "none", "<na>") else UNKNOWN)
    return np.asarray(out, dtype=object)


def _sort_key(value: str) -> tuple[int, str]:
    return (value == UNKNOWN, value)


def evaluate_predictions(
    probs: Any,
    y_true: Any,
    groups: pd.DataFrame | None = None,
    *,
    classes: Sequence[str] = CLASSES,
    subgroup_columns: Sequence[str] = DEFAULT_SUBGROUP_COLUMNS,
    flag_min_n: int = 10,
    flag_margin: float = 0.15,
) -> EvalReport:
    """Score class probabilities against true labels, overall and per subgroup.

    probs: (N, C) probabilities in `classes` order; y_true: (N,) class indices; groups: a
    DataFrame in the same row order whose `subgroup_columns` (those present) define subgroups.
    A subgroup is flagged when its COVID sensitivity (specificity) is more than flag_margin
    below the overall figure and it holds at least flag_min_n COVID (non-COVID) images, the
    rate's own denominator; undefined figures are skipped.
    """
    classes = [str(c) for c in classes]
    if POSITIVE_CLASS not in classes:
        raise ValueError(f"classes must include {POSITIVE_CLASS!r}, got {classes}")
    p = _probs(probs)
    if p.shape[1] != len(classes):
        raise ValueError(f"probs has {p.shape[1]} columns but there are {len(classes)} classes")
    t = _labels(y_true, len(classes), "y_true")
    n = int(p.shape[0])
    if t.shape[0] != n:
        raise ValueError(f"probs and y_true differ in length: {n} vs {t.shape[0]}")
    if n == 0:
        raise ValueError("nothing to evaluate: no predictions")
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} rows but there are {n} predictions")

    pred = p.argmax(axis=1)
    pos = classes.index(POSITIVE_CLASS)
    cm = confusion_matrix(t, pred, len(classes))
    per_class = per_class_metrics(cm, classes)
    sens, spec = _covid_rates(t, pred, pos)
    overall = (sens.value, spec.value)

    subgroups: dict[str, dict[str, SubgroupMetrics]] = {}
    flagged: list[str] = []
    adult: SubgroupMetrics | None = None
    if groups is not None:
        for column in subgroup_columns:
            if column not in groups.columns:
                continue
            values = _group_values(groups[column])
            per_value: dict[str, SubgroupMetrics] = {}
            for value in sorted(set(values.tolist()), key=_sort_key):
                mask = values == value
                m = _subgroup(t[mask], pred[mask], pos, overall, flag_min_n, flag_margin)
                per_value[value] = m
                if m.flagged:
                    flagged.append(f"{column}={value} (n={m.n}): {m.flag_reason}")
            subgroups[column] = per_value
        if "age_group" in groups.columns:
            ages = np.asarray([v.lower() for v in _group_values(groups["age_group"])])
            mask = ages == "adult"
            if mask.any():
                adult = _subgroup(t[mask], pred[mask], pos, overall, flag_min_n, flag_margin)

    return EvalReport(
        n=n,
        accuracy=float((pred == t).mean()),
        macro_f1=float(np.mean([m.f1 for m in per_class.values()])),
        per_class=per_class,
        covid_recall=per_class[POSITIVE_CLASS].recall,
        covid_specificity=spec.value if spec.value is not None else 0.0,
        ece=expected_calibration_error(p, t),
        n_covid=sens.n,
        n_non_covid=spec.n,
        accuracy_ci=wilson_interval(int((pred == t).sum()), n),
        covid_recall_ci=sens.ci,
        covid_specificity_ci=spec.ci,
        confusion=cm.tolist(),
        classes=classes,
        subgroups=subgroups,
        flagged=flagged,
        adult=adult,
    )
