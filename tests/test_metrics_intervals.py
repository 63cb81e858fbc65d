"""Subgroup flags need cases in the rate's own denominator; every rate has a Wilson 95 %
interval in the JSON, the console tables and the markdown."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from covidray.cli.render import render_text
from covidray.evaluation.artifacts import per_class_table_markdown
from covidray.evaluation.metrics import evaluate_predictions

COVID, PNEUMONIA, NORMAL = 0, 1, 2
Z2 = 1.959963984540054**2


def probs_for(pred: list[int]) -> np.ndarray:
    out = np.full((len(pred), 3), 0.1)
    out[np.arange(len(pred)), pred] = 0.8
    return out


def case() -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Overall: 40 + 12 + 3 COVID-19 images, sensitivity well above 0.5.

    * ``few``: 30 images, only 3 of them COVID-19, all missed (sensitivity 0/3), and 27
      non-COVID all right: a subgroup of 30 images whose sensitivity rests on 3 cases.
    * ``many``: 12 COVID-19 images, 2 found (2/12), and 10 non-COVID all right.
    * ``rest``: 40 COVID-19 all found, 40 non-COVID all right.
    """
    y_true, y_pred, group = [], [], []

    def add(name: str, true: int, pred: int, n: int) -> None:
        y_true.extend([true] * n)
        y_pred.extend([pred] * n)
        group.extend([name] * n)

    add("few", COVID, PNEUMONIA, 3)
    add("few", NORMAL, NORMAL, 27)
    add("many", COVID, COVID, 2)
    add("many", COVID, NORMAL, 10)
    add("many", NORMAL, NORMAL, 10)
    add("rest", COVID, COVID, 40)
    add("rest", PNEUMONIA, PNEUMONIA, 40)
    ages = ["adult" if g != "rest" else "child" for g in group]
    groups = pd.DataFrame({"source": group, "age_group": ages})
    return probs_for(y_pred), np.array(y_true), groups


def test_flag_needs_ten_cases_in_the_rates_denominator() -> None:
    probs, y, groups = case()
    report = evaluate_predictions(probs, y, groups)
    few = report.subgroups["source"]["few"]
    many = report.subgroups["source"]["many"]
    assert report.covid_recall == pytest.approx(42 / 55)
    assert few.n == 30 and few.covid_recall == 0.0  # far below overall, but on 3 cases
    assert few.n_covid == 3 and few.n_non_covid == 27
    assert not few.flagged and few.flag_reason is None
    assert many.n_covid == 12 and many.covid_recall == pytest.approx(2 / 12)
    assert many.flagged and many.flag_reason.startswith("COVID sensitivity 0.17 (2/12, 95% CI")
    # Adults: the 3 + 12 COVID-19 images of few and many, 2 found: 15 cases, flagged too.
    assert [line.split(" (")[0] for line in report.flagged] == ["source=many", "age_group=adult"]


def test_every_rate_has_a_wilson_interval_in_the_json() -> None:
    from covidray.evaluation.metrics import wilson_interval

    # Closed forms: k = 0 gives [0, z²/(n+z²)], k = n gives [n/(n+z²), 1]; 5/10 is symmetric.
    assert wilson_interval(0, 10) == pytest.approx((0.0, Z2 / (10 + Z2)))
    assert wilson_interval(12, 12) == pytest.approx((12 / (12 + Z2), 1.0))
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(1 - hi) and lo == pytest.approx(0.2366, abs=1e-4)
    assert wilson_interval(0, 0) is None

    probs, y, groups = case()
    out = json.loads(json.dumps(evaluate_predictions(probs, y, groups).to_json()))
    assert out["covid_recall_ci"] == pytest.approx(list(wilson_interval(42, 55)))
    assert out["n_covid"] == 55 and out["n_non_covid"] == 77
    assert out["covid_specificity_ci"] == pytest.approx(list(wilson_interval(77, 77)))
    assert out["accuracy_ci"] == pytest.approx(list(wilson_interval(119, 132)))
    for name, m in out["per_class"].items():
        assert len(m["precision_ci"]) == 2 and len(m["recall_ci"]) == 2, name
    few = out["subgroups"]["source"]["few"]
    assert few["covid_recall_ci"] == pytest.approx(list(wilson_interval(0, 3)))
    assert few["covid_specificity_ci"] == pytest.approx(list(wilson_interval(27, 27)))
    assert few["accuracy_ci"] == pytest.approx(list(wilson_interval(27, 30)))
    assert out["adult"]["n_covid"] == 15 and out["adult"]["covid_recall_ci"] is not None
    rest = out["subgroups"]["age_group"]["child"]
    assert rest["covid_recall_ci"] == pytest.approx(list(wilson_interval(40, 40)))


def test_text_and_markdown_show_intervals_and_denominators() -> None:
    probs, y, groups = case()
    report = evaluate_predictions(probs, y, groups)
    console = Console(record=True, width=200)
    console.print(render_text(report))
    text = console.export_text()
    md = per_class_table_markdown(report)
    lo, hi = report.covid_recall_ci
    overall = f"COVID sensitivity {report.covid_recall:.3f} [{lo:.2f}, {hi:.2f}] (n=55)"
    for out in (text, md):
        assert overall in out
        assert "Wilson 95% interval" in out
        assert "COVID n" in out and "non-COVID n" in out
        assert "0.000 [0.00, 0.56]" in out  # few: 0/3
        assert "0.167 [0.05, 0.45]" in out  # many: 2/12
    assert "| few | 30 | 0.900 [0.74, 0.97] | 3 | 0.000 [0.00, 0.56] | 27 |" in md
