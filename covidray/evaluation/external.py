"""External validity figures: how well the model separates COVID-19 from adult non-COVID films.

Every COVID-19 film of the public collections is an adult's, most children are Kaggle's
non-COVID films: accuracy and argmax figures reward telling children from adults and one source
from another. The figures here compare like with like: the **AUROC of COVID-19 vs adult
non-COVID films** on the calibrated ``covid`` probability (every film, gated or not, with the
gate's refusals counted beside it), with a patient-level bootstrap interval; and an operating
point next to the argmax figures, the **COVID recall at the threshold that keeps 90 % of val's
adult non-COVID films below it**. On a source-held-out dataset (``--split-test-sources``) they
are also given for the held-out sources alone and for the held-out sources plus the other
sources' adult non-COVID films of the same split (see docs/source-study.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel

from .intervals import auroc, bootstrap, wilson

TARGET_SPECIFICITY = 0.90
Interval = tuple[float, float]


class Threshold(BaseModel):
    """The operating point fitted on val: call COVID-19 when ``p(covid) > value``."""

    value: float | None  # None: val has no adult non-COVID film
    target_specificity: float = TARGET_SPECIFICITY
    val_specificity: float | None = None  # reached on val's adult non-COVID films
    n_val_negatives: int = 0


class Rate(BaseModel):
    """``k`` of ``n`` with its Wilson 95 % interval (``value`` None for ``n == 0``)."""

    k: int
    n: int
    value: float | None
    ci: Interval | None

    @classmethod
    def of(cls, hits: np.ndarray) -> Rate:
        k, n = int(hits.sum()), int(hits.size)
        return cls(k=k, n=n, value=k / n if n else None, ci=wilson(k, n))


class Separation(BaseModel):
    """COVID-19 vs adult non-COVID films of one set of rows."""

    n_covid: int
    n_adult_non_covid: int
    n_patients: int
    auroc: float | None  # None: one of the two groups is empty
    auroc_ci: Interval | None  # patient-level bootstrap 95 %
    covid_recall_argmax: Rate
    covid_recall_at_threshold: Rate | None  # None: no threshold
    adult_non_covid_called_covid_argmax: Rate
    adult_non_covid_called_covid_at_threshold: Rate | None
    refused_covid: int | None  # the gate's refusals among these films; None: no gate
    refused_adult_non_covid: int | None


class SeparationFigures(BaseModel):
    """The figures of one evaluated split; ``held_out*`` only on a source-held-out dataset."""

    threshold: Threshold
    all: Separation | None  # None: no COVID-19 nor adult non-COVID film
    held_out_sources: list[str] = []
    held_out: Separation | None = None  # the held-out sources' films alone
    held_out_plus: Separation | None = None  # plus the other sources' adult non-COVID films
    # The other sources' rows of the split (every class and age), at argmax: what a change
    # costs on the sources the model trained on.
    in_distribution_accuracy: Rate | None = None
    in_distribution_covid_recall: Rate | None = None


def covid_auroc(scores: np.ndarray, is_covid: np.ndarray) -> float:
    """AUROC of ``scores`` for COVID-19 (``is_covid``) against the other rows (ties half)."""
    return auroc(scores[~is_covid], scores[is_covid])


def specificity_threshold(
    negatives: np.ndarray, target: float = TARGET_SPECIFICITY
) -> float | None:
    """The lowest negative score ``t`` with at least ``target`` of ``negatives`` ``<= t``:
    calling positive above it keeps that specificity. None without negatives."""
    s = np.sort(np.asarray(negatives, dtype=float))
    if not s.size:
        return None
    k = max(1, math.ceil(round(target * s.size, 9)))
    return float(s[k - 1])


def fit_threshold(scores: np.ndarray, is_covid: np.ndarray, adult: np.ndarray) -> Threshold:
    """The 90 % specificity operating point on val's adult non-COVID films."""
    negatives = scores[~is_covid & adult]
    value = specificity_threshold(negatives)
    return Threshold(
        value=value,
        val_specificity=None if value is None else float((negatives <= value).mean()),
        n_val_negatives=int(negatives.size),
    )


def separation(
    scores: np.ndarray,
    is_covid: np.ndarray,
    called_covid: np.ndarray,
    patients: np.ndarray,
    refused: np.ndarray | None,
    threshold: float | None,
) -> Separation | None:
    """The figures of rows that are all COVID-19 or adult non-COVID (``is_covid`` tells
    which); None for no rows."""
    if not scores.size:
        return None
    neg = ~is_covid
    both = bool(is_covid.any() and neg.any())
    above = None if threshold is None else scores > threshold
    return Separation(
        n_covid=int(is_covid.sum()),
        n_adult_non_covid=int(neg.sum()),
        n_patients=len(set(patients.tolist())),
        auroc=covid_auroc(scores, is_covid) if both else None,
        auroc_ci=bootstrap(covid_auroc, scores, is_covid, clusters=patients) if both else None,
        covid_recall_argmax=Rate.of(called_covid[is_covid]),
        covid_recall_at_threshold=None if above is None else Rate.of(above[is_covid]),
        adult_non_covid_called_covid_argmax=Rate.of(called_covid[neg]),
        adult_non_covid_called_covid_at_threshold=None if above is None else Rate.of(above[neg]),
        refused_covid=None if refused is None else int(refused[is_covid].sum()),
        refused_adult_non_covid=None if refused is None else int(refused[neg].sum()),
    )


def separation_figures(
    probs: np.ndarray,
    labels: np.ndarray,
    rows: Any,
    threshold: Threshold,
    *,
    covid_index: int,
    refused: np.ndarray | None = None,
    held_out_sources: Sequence[str] = (),
) -> SeparationFigures:
    """The split's figures: ``probs`` (N, C) calibrated, ``labels`` (N,) class indices,
    ``rows`` a DataFrame in the same order with ``patient_id``, ``age_group`` and ``source``."""
    scores = np.asarray(probs, dtype=float)[:, covid_index]
    is_covid = np.asarray(labels) == covid_index
    adult = rows["age_group"].astype(str).str.lower().to_numpy() == "adult"
    called = np.asarray(probs).argmax(1) == covid_index
    patients = rows["patient_id"].astype(str).to_numpy()
    in_source = rows["source"].isin(list(held_out_sources)).to_numpy()
    kept = is_covid | (~is_covid & adult)

    def figures(mask: np.ndarray) -> Separation | None:
        return separation(
            scores[mask],
            is_covid[mask],
            called[mask],
            patients[mask],
            None if refused is None else refused[mask],
            threshold.value,
        )

    held = bool(held_out_sources)
    inside = ~in_source
    right = np.asarray(probs).argmax(1) == np.asarray(labels)
    return SeparationFigures(
        threshold=threshold,
        all=figures(kept),
        held_out_sources=sorted(held_out_sources),
        held_out=figures(kept & in_source) if held else None,
        held_out_plus=figures(kept & (in_source | (~is_covid & adult))) if held else None,
        in_distribution_accuracy=Rate.of(right[inside]) if held else None,
        in_distribution_covid_recall=Rate.of(called[inside & is_covid]) if held else None,
    )


def paired_auroc_difference(
    scores: np.ndarray, baseline: np.ndarray, is_covid: np.ndarray, patients: np.ndarray
) -> tuple[float, Interval | None]:
    """AUROC of ``scores`` minus that of ``baseline`` on the same films, with the 95 %
    interval of a paired patient-level bootstrap (both resampled alike). Scores of shape
    (films, runs), e.g. one column per seed paired with the baseline of the same seed: the
    mean of the per-run differences, each bootstrap sample resampling the films of every run
    alike."""

    def diff(a: np.ndarray, b: np.ndarray, y: np.ndarray) -> float:
        if a.ndim == 1:
            return covid_auroc(a, y) - covid_auroc(b, y)
        return float(
            np.mean([covid_auroc(a[:, k], y) - covid_auroc(b[:, k], y) for k in range(a.shape[1])])
        )

    return diff(scores, baseline, is_covid), bootstrap(
        diff, scores, baseline, is_covid, clusters=patients
    )


def _ci(ci: Interval | None) -> str:
    return "" if ci is None else f" ({ci[0]:.2f}–{ci[1]:.2f})"


def _rate(r: Rate | None) -> str:
    return "n/a" if r is None or r.value is None else f"{r.k}/{r.n} = {r.value:.2f}{_ci(r.ci)}"


def auroc_text(s: Separation | None) -> str:
    """``0.881 (0.80–0.94)``: the AUROC with its patient-level interval, or n/a."""
    return "n/a" if s is None or s.auroc is None else f"{s.auroc:.3f}{_ci(s.auroc_ci)}"


def separation_text(figures: SeparationFigures) -> str:
    """The figures as text lines, one per set of rows (the CLI's evaluation report)."""
    t = figures.threshold
    point = (
        "no operating point (no adult non-COVID film in val)"
        if t.value is None
        else f"operating point p(covid) > {t.value:.3f} ({t.val_specificity:.2f} of "
        f"{t.n_val_negatives} val adult non-COVID films below it)"
    )
    lines = [f"COVID-19 vs adult non-COVID films, {point}:"]
    sets = [("every film", figures.all)]
    if figures.held_out_sources:
        names = ", ".join(figures.held_out_sources)
        sets += [
            (f"held-out sources ({names})", figures.held_out),
            ("held-out + other sources' adult non-COVID", figures.held_out_plus),
        ]
    for name, s in sets:
        if s is None:
            lines.append(f"  {name}: no film")
            continue
        refused = (
            "no gate"
            if s.refused_covid is None
            else f"gate refused {s.refused_covid} COVID-19, {s.refused_adult_non_covid} adult "
            "non-COVID (all scored)"
        )
        lines.append(
            f"  {name}: {s.n_covid} COVID-19 vs {s.n_adult_non_covid} adult non-COVID "
            f"({s.n_patients} patients) · AUROC {auroc_text(s)} · COVID recall argmax "
            f"{_rate(s.covid_recall_argmax)}, at the operating point "
            f"{_rate(s.covid_recall_at_threshold)} · adult non-COVID called COVID-19 argmax "
            f"{_rate(s.adult_non_covid_called_covid_argmax)}, at the operating point "
            f"{_rate(s.adult_non_covid_called_covid_at_threshold)} · {refused}"
        )
    if figures.held_out_sources:
        lines.append(
            f"  other sources' films (in distribution): accuracy "
            f"{_rate(figures.in_distribution_accuracy)} · COVID recall "
            f"{_rate(figures.in_distribution_covid_recall)}"
        )
    return "\n".join(lines)
