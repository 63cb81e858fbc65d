"""Evaluation metrics: confusion matrix, per-class scores, calibration and subgroup breakdowns.

Why subgroups are mandatory: in the public COVID chest X-ray collections the classes differ by
source and by age (COVID images come from a few hospitals and papers, pneumonia images largely
from a paediatric cohort, normals from yet other archives). A model can score well by learning
the source, the age or the view rather than the disease (DeGrave et al., "AI for radiographic
COVID-19 detection selects shortcuts over signal", Nature Machine Intelligence 2021). So every
evaluation here breaks its metrics down by source, age group and view, flags subgroups whose
COVID sensitivity or specificity falls well below the overall figure, and reports adult-only
figures separately: accuracy on a confounded split is never reported alone.

Everything is a pure function over arrays and DataFrames; no model code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel

from ..labels import CLASSES

POSITIVE_CLASS = "covid"
UNKNOWN = "unknown"
DEFAULT_SUBGROUP_COLUMNS: tuple[str, ...] = ("source", "age_group", "view")


# ----------------------------------------------------------------------------- models


class ClassMetrics(BaseModel):
    """One-vs-rest scores of one class."""

    precision: float
    recall: float
    f1: float
    support: int


class SubgroupMetrics(BaseModel):
    """Figures for the images of one subgroup; None where a figure is undefined."""

    n: int
    accuracy: float
    covid_recall: float | None  # None: no covid images in the group
    covid_specificity: float | None  # None: no non-covid images in the group
    flagged: bool = False
    flag_reason: str | None = None

    def compact(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "covid_recall": self.covid_recall,
            "covid_specificity": self.covid_specificity,
        }


class EvalReport(BaseModel):
    """Everything an evaluation reports. Overall figures plus the mandatory breakdowns."""

    n: int
    accuracy: float
    macro_f1: float
    per_class: dict[str, ClassMetrics]
    covid_recall: float  # 0.0 when there are no covid images (zero-division convention)
    covid_specificity: float  # 0.0 when there are no non-covid images
    ece: float
    confusion: list[list[int]]  # rows true, columns predicted, in `classes` order
    classes: list[str]
    subgroups: dict[str, dict[str, SubgroupMetrics]]  # column -> value -> metrics
    flagged: list[str]  # human-readable lines, one per flagged subgroup
    adult: SubgroupMetrics | None  # age_group == 'adult' only; None without such rows

    def to_json(self) -> dict[str, Any]:
        """A compact, JSON-serialisable summary (plain Python numbers, lists and dicts)."""
        return {
            "n": self.n,
            "classes": list(self.classes),
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "per_class": {name: m.model_dump() for name, m in self.per_class.items()},
            "covid_recall": self.covid_recall,
            "covid_specificity": self.covid_specificity,
            "ece": self.ece,
            "confusion": [list(row) for row in self.confusion],
            "subgroups": {
                column: {value: m.compact() for value, m in values.items()}
                for column, values in self.subgroups.items()
            },
            "flagged": list(self.flagged),
            "adult": self.adult.compact() if self.adult is not None else None,
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
        out[name] = ClassMetrics(precision=precision, recall=recall, f1=f1, support=support)
    return out


def _covid_rates(
    y_true: np.ndarray, y_pred: np.ndarray, pos: int
) -> tuple[float | None, float | None]:
    """(sensitivity, specificity) with `pos` as the positive class; None where undefined."""
    is_pos = y_true == pos
    said_pos = y_pred == pos
    n_pos = int(is_pos.sum())
    n_neg = int((~is_pos).sum())
    sens = float((is_pos & said_pos).sum()) / n_pos if n_pos else None
    spec = float((~is_pos & ~said_pos).sum()) / n_neg if n_neg else None
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
    accuracy = float((y_true == y_pred).mean()) if n else 0.0
    sens, spec = _covid_rates(y_true, y_pred, pos)
    reasons: list[str] = []
    if n >= flag_min_n:
        for label, value, ref in (
            ("COVID sensitivity", sens, overall[0]),
            ("COVID specificity", spec, overall[1]),
        ):
            if value is not None and ref is not None and ref - value > flag_margin + 1e-12:
                reasons.append(f"{label} {value:.2f} vs {ref:.2f} overall")
    return SubgroupMetrics(
        n=n,
        accuracy=accuracy,
        covid_recall=sens,
        covid_specificity=spec,
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
    A subgroup with n >= flag_min_n is flagged when its COVID sensitivity or specificity is more
    than flag_margin below the overall figure (undefined figures are skipped).
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
    overall = (sens, spec)

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
        covid_specificity=spec if spec is not None else 0.0,
        ece=expected_calibration_error(p, t),
        confusion=cm.tolist(),
        classes=classes,
        subgroups=subgroups,
        flagged=flagged,
        adult=adult,
    )
