"""COVID-19 vs adult non-COVID figures (covidray.evaluation.external): known cases by hand, the
patient-level bootstrap, and ``covidray evaluate`` on a source-held-out dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from heldout_data import two_sources
from tinymodels import save_tiny_model

from covidray.cli import main
from covidray.config import IngestConfig, SplitConfig
from covidray.dataset import load_rows
from covidray.evaluation.evaluate import predict_rows
from covidray.evaluation.external import (
    covid_auroc,
    fit_threshold,
    paired_auroc_difference,
    separation_figures,
    specificity_threshold,
)
from covidray.evaluation.intervals import bootstrap
from covidray.ingest import ingest
from covidray.labels import CLASSES
from covidray.predict import Predictor

COVID = CLASSES.index("covid")


def test_auroc_by_hand() -> None:
    # positives 0.9, 0.8, 0.4 against negatives 0.7, 0.3, 0.2, 0.1: 11 of 12 pairs ordered
    scores = np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.2, 0.1])
    is_covid = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    assert covid_auroc(scores, is_covid) == pytest.approx(11 / 12)
    # a tie counts half: positive 0.5 vs negatives 0.5 and 0.2 -> (0.5 + 1) / 2
    assert covid_auroc(np.array([0.5, 0.5, 0.2]), np.array([1, 0, 0], bool)) == 0.75


def test_threshold_keeps_the_specificity_on_val() -> None:
    negatives = np.arange(1, 11) / 10  # 0.1 ... 1.0
    assert specificity_threshold(negatives) == pytest.approx(0.9)  # 9 of 10 at or below
    assert specificity_threshold(np.arange(1, 21) / 20) == pytest.approx(0.9)  # 18 of 20
    assert specificity_threshold(np.array([0.3])) == 0.3
    assert specificity_threshold(np.array([])) is None
    scores = np.concatenate([negatives, [0.95, 0.5], [0.99]])
    is_covid = np.array([0] * 10 + [1, 1, 0], bool)
    adult = np.array([True] * 12 + [False])  # the child's 0.99 does not count
    t = fit_threshold(scores, is_covid, adult)
    assert t.value == pytest.approx(0.9) and t.val_specificity == 0.9 and t.n_val_negatives == 10


def _rows(sources: list[str], ages: list[str], patients: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"source": sources, "age_group": ages, "patient_id": patients})


def test_separation_figures_known_case() -> None:
    # rows: 3 COVID (two from the held-out "h"), 3 adult non-COVID (one from "h"), 1 child
    covid_p = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.95])
    other = next(c for c in range(3) if c != COVID)
    labels = np.array([COVID] * 3 + [other] * 4)
    probs = np.zeros((7, 3))
    probs[:, COVID], probs[:, other] = covid_p, 1 - covid_p
    rows = _rows(
        ["h", "h", "o", "h", "o", "o", "o"],
        ["adult"] * 6 + ["child"],
        ["p1", "p1", "p2", "p3", "p4", "p5", "p6"],
    )
    refused = np.array([0, 1, 0, 0, 0, 1, 0], bool)
    t = fit_threshold(
        np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
        np.zeros(10, bool),
        np.ones(10, bool),
    )
    figs = separation_figures(
        probs, labels, rows, t, covid_index=COVID, refused=refused, held_out_sources=["h"]
    )
    every = figs.all
    assert (every.n_covid, every.n_adult_non_covid, every.n_patients) == (3, 3, 5)
    # positives 0.9 0.6 0.2 vs negatives 0.7 0.1 0.3: 3 + 2 + 1 of 9 pairs ordered
    assert every.auroc == pytest.approx((3 + 2 + 1) / 9)
    assert (every.covid_recall_argmax.k, every.covid_recall_argmax.n) == (2, 3)  # 0.9, 0.6
    assert every.covid_recall_at_threshold.k == 0  # nothing above 0.9
    assert every.adult_non_covid_called_covid_argmax.k == 1  # 0.7
    assert (every.refused_covid, every.refused_adult_non_covid) == (1, 1)
    held = figs.held_out  # 0.9 0.6 vs 0.7
    assert (held.n_covid, held.n_adult_non_covid) == (2, 1) and held.auroc == 0.5
    plus = figs.held_out_plus  # 0.9 0.6 vs 0.7 0.1 0.3
    assert (plus.n_covid, plus.n_adult_non_covid) == (2, 3)
    assert plus.auroc == pytest.approx(5 / 6)
    assert figs.held_out_sources == ["h"]
    # in distribution: the 4 rows of "o" (child included), right at argmax: 0.2 no, 0.1 and
    # 0.3 yes (not COVID-19), the child's 0.95 no
    acc = figs.in_distribution_accuracy
    assert (acc.k, acc.n) == (2, 4)
    assert (figs.in_distribution_covid_recall.k, figs.in_distribution_covid_recall.n) == (0, 1)


def test_paired_difference() -> None:
    y = np.array([1, 1, 1, 0, 0, 0], bool)
    better = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])  # AUROC 1
    worse = np.array([0.9, 0.2, 0.7, 0.3, 0.8, 0.1])  # 0.9 > 3, 0.7 > 2, 0.2 > 1: 6/9
    patients = np.arange(6)
    diff, ci = paired_auroc_difference(better, worse, y, patients)
    assert diff == pytest.approx(1 - 6 / 9) and ci[0] <= diff <= ci[1]
    assert paired_auroc_difference(worse, worse, y, patients) == (0.0, (0.0, 0.0))
    # one column per seed, each paired with its own baseline: the mean of the differences
    two = paired_auroc_difference(
        np.column_stack([better, better]), np.column_stack([worse, better]), y, patients
    )
    assert two[0] == pytest.approx((1 - 6 / 9) / 2) and two[1][0] <= two[0] <= two[1][1]


def test_patient_bootstrap_keeps_a_patients_films_together() -> None:
    # 6 patients of 30 identical films each: the mean over rows varies as 6 draws, not 180
    values = np.repeat(np.arange(6, dtype=float), 30)
    patients = np.repeat(np.arange(6), 30)
    by_row = bootstrap(np.mean, values)
    by_patient = bootstrap(np.mean, values, clusters=patients)
    assert by_patient[1] - by_patient[0] > 2.5 * (by_row[1] - by_row[0])
    assert bootstrap(np.mean, values, clusters=np.zeros(180)) is None  # one patient


def test_evaluate_reports_held_out_sources(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw, data = tmp_path / "raw", tmp_path / "ds"
    two_sources(raw)
    ingest(
        IngestConfig(
            src=str(raw), dest=str(data), size=64, split=SplitConfig(test_sources=("site-b",))
        )
    )
    model = str(tmp_path / "model")
    save_tiny_model(model, seed=1, size=64)
    assert main(["evaluate", "--model", model, "--data", str(data), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    sep = report["separation"]
    floor = report["ece_if_calibrated"]  # the ECE a calibrated model shows on as many films
    assert 0 <= floor[0] <= floor[1] <= 1

    rows = load_rows(str(data))
    test = rows[rows["split"] == "test"].reset_index(drop=True)
    held = test["source"] == "site-b"
    covid = test["label"] == "covid"
    adult_neg = ~covid & (test["age_group"] == "adult")
    assert sep["held_out_sources"] == ["site-b"]
    assert sep["held_out"]["n_covid"] == int((held & covid).sum()) > 0
    assert sep["held_out"]["n_adult_non_covid"] == int((held & adult_neg).sum()) > 0
    assert sep["held_out_plus"]["n_adult_non_covid"] == int(adult_neg.sum())
    assert sep["all"]["n_covid"] + sep["all"]["n_adult_non_covid"] == int((covid | adult_neg).sum())

    predictor = Predictor.from_dir(model)
    scores = predict_rows(predictor, test).probs[:, COVID]
    mask = (held & (covid | adult_neg)).to_numpy()
    assert sep["held_out"]["auroc"] == pytest.approx(
        covid_auroc(scores[mask], covid.to_numpy()[mask]), abs=1e-6
    )
    val = rows[rows["split"] == "val"].reset_index(drop=True)
    val_scores = predict_rows(predictor, val).probs[:, COVID]
    val_neg = ((val["label"] != "covid") & (val["age_group"] == "adult")).to_numpy()
    assert sep["threshold"]["value"] == pytest.approx(
        specificity_threshold(val_scores[val_neg]), abs=1e-6
    )

    assert main(["evaluate", "--model", model, "--data", str(data)]) == 0
    text = capsys.readouterr().out
    assert "held-out sources (site-b)" in text and "AUROC" in text
    assert "a calibrated model shows" in text
