"""Evaluation metrics and rendering, against small hand-computed examples."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from rich.console import Console

from covidray.cli.render import render_text
from covidray.evaluation.artifacts import confusion_png, per_class_table_markdown
from covidray.evaluation.metrics import (
    EvalReport,
    confusion_matrix,
    ece_if_calibrated,
    evaluate_predictions,
    expected_calibration_error,
)
from covidray.labels import CLASSES

COVID, PNEUMONIA, NORMAL = 0, 1, 2
assert CLASSES == ("covid", "pneumonia", "normal")


def one_hot_probs(pred: list[int], conf: float = 0.8, num_classes: int = 3) -> np.ndarray:
    """Probabilities whose argmax is `pred`, with top probability `conf`."""
    probs = np.full((len(pred), num_classes), (1.0 - conf) / (num_classes - 1))
    probs[np.arange(len(pred)), pred] = conf
    return probs


# Hand example. cm = [[2,1,0],[0,1,1],[2,0,2]]
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2]
Y_PRED = [0, 1, 0, 1, 2, 2, 2, 0, 0]


def test_confusion_matrix_rows_are_true_class():
    cm = confusion_matrix(np.array([0]), np.array([2]))
    assert cm.shape == (3, 3)
    assert cm[0, 2] == 1 and cm.sum() == 1  # row = true covid, column = predicted normal
    assert confusion_matrix(Y_TRUE, Y_PRED).tolist() == [[2, 1, 0], [0, 1, 1], [2, 0, 2]]


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 0])
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0])


def test_precision_recall_f1_by_hand():
    report = evaluate_predictions(one_hot_probs(Y_PRED), np.array(Y_TRUE))
    assert report.confusion == [[2, 1, 0], [0, 1, 1], [2, 0, 2]]
    assert report.classes == list(CLASSES)
    covid, pneu, normal = (report.per_class[c] for c in CLASSES)
    # covid: TP 2, predicted 4, true 3
    assert covid.precision == pytest.approx(0.5)
    assert covid.recall == pytest.approx(2 / 3)
    assert covid.f1 == pytest.approx(4 / 7)
    assert covid.support == 3
    # pneumonia: TP 1, predicted 2, true 2
    assert (pneu.precision, pneu.recall, pneu.f1, pneu.support) == pytest.approx((0.5, 0.5, 0.5, 2))
    # normal: TP 2, predicted 3, true 4
    assert normal.precision == pytest.approx(2 / 3)
    assert normal.recall == pytest.approx(0.5)
    assert normal.f1 == pytest.approx(4 / 7)
    assert normal.support == 4
    assert report.accuracy == pytest.approx(5 / 9)
    assert report.macro_f1 == pytest.approx((4 / 7 + 0.5 + 4 / 7) / 3)
    assert report.covid_recall == pytest.approx(2 / 3)
    # covid specificity: 6 non-covid images, 2 of them called covid -> 4 / 6
    assert report.covid_specificity == pytest.approx(4 / 6)
    assert report.n == 9


def test_zero_division_gives_zero():
    # pneumonia is neither present nor predicted
    report = evaluate_predictions(one_hot_probs([0, 2, 2]), np.array([0, 2, 0]))
    assert report.per_class["pneumonia"].model_dump() == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 0,
        "precision_ci": None,  # no denominator, no interval
        "recall_ci": None,
    }


def test_ece_constructed_cases():
    # all confidences 0.8, 8 of 10 correct -> perfectly calibrated
    probs = one_hot_probs([0] * 10, conf=0.8)
    y = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, y) == pytest.approx(0.0, abs=1e-12)
    # all 0.9, half correct -> |0.5 - 0.9|
    probs = one_hot_probs([0] * 10, conf=0.9)
    y = np.array([0] * 5 + [1] * 5)
    assert expected_calibration_error(probs, y) == pytest.approx(0.4)
    # two bins: 5 at 0.9 all right (0.1), 5 at 0.6 all wrong (0.6) -> 0.5*0.1 + 0.5*0.6
    probs = np.vstack([one_hot_probs([0] * 5, 0.9), one_hot_probs([0] * 5, 0.6)])
    y = np.array([0] * 5 + [1] * 5)
    assert expected_calibration_error(probs, y) == pytest.approx(0.35)


def _dirichlet_probs(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(3, 0.3), size=n)


def test_ece_if_calibrated_is_the_estimators_floor_on_few_films():
    # Labels drawn from the model's own probabilities: a calibrated model by construction.
    # On 118 films its observed ECE lies inside the consistency range about 95 % of the time,
    # and the range is far above 0: binned ECE is biased upwards on few films.
    inside, floor = 0, []
    for seed in range(40):
        p = _dirichlet_probs(118, seed)
        y = (np.random.default_rng(100 + seed).random((118, 1)) > np.cumsum(p, 1)).sum(1)
        median, q95 = ece_if_calibrated(p, n_sim=300, seed=seed)
        assert 0 < median < q95 < 1
        inside += expected_calibration_error(p, np.minimum(y, 2)) <= q95
        floor.append(median)
    assert inside >= 34  # ~95 % of 40
    assert np.mean(floor) > 0.04
    # the floor shrinks with the number of films
    big = ece_if_calibrated(_dirichlet_probs(5000, 0), n_sim=50)
    assert big[1] < np.mean(floor) / 3


def test_ece_if_calibrated_flags_an_overconfident_model():
    # probabilities sharpened after the labels were drawn: the model claims more than it has
    rng = np.random.default_rng(7)
    p = _dirichlet_probs(400, 7)
    y = np.minimum((rng.random((400, 1)) > np.cumsum(p, 1)).sum(1), 2)
    sharp = p**3 / (p**3).sum(1, keepdims=True)
    assert expected_calibration_error(sharp, y) > ece_if_calibrated(sharp, n_sim=300)[1]
    assert ece_if_calibrated(np.zeros((0, 3))) is None
    # the same seed gives the same range
    assert ece_if_calibrated(p, n_sim=50, seed=3) == ece_if_calibrated(p, n_sim=50, seed=3)


def test_ece_bin_edges_and_extremes():
    # confidence exactly 1.0 goes in the last bin
    assert expected_calibration_error(np.array([[1.0, 0.0, 0.0]]), [0]) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([[1.0, 0.0, 0.0]]), [1]) == pytest.approx(1.0)
    # confidence 0 (degenerate all-zero row) goes in the first bin
    assert expected_calibration_error(np.zeros((1, 3)), [0]) == pytest.approx(1.0)
    # bins are right-closed: 2/3 = 10/15 sits in (9/15, 10/15], 0.7 in the next bin
    probs = np.array([[2 / 3, 1 / 6, 1 / 6], [0.7, 0.2, 0.1]])
    separate = 0.5 * (1 - 2 / 3) + 0.5 * 0.7
    assert expected_calibration_error(probs, [0, 1]) == pytest.approx(separate)
    assert expected_calibration_error(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 0.0
    with pytest.raises(ValueError, match="softmax"):
        expected_calibration_error(np.array([[2.5, -1.0, 0.3]]), [0])


def _flag_case(
    non_covid_a: int = 10, covid_a: int = 2
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Source A: ``non_covid_a`` non-covid (half called covid -> specificity 0.5) plus
    ``covid_a`` covid images, all found.

    Source B: 40 non-covid all right plus 10 covid all right. With 10 non-covid in A the overall
    specificity is 45/50 = 0.9.
    """
    wrong = non_covid_a // 2
    y_true = [NORMAL] * non_covid_a + [COVID] * covid_a + [NORMAL] * 40 + [COVID] * 10
    y_pred = (
        [COVID] * wrong
        + [NORMAL] * (non_covid_a - wrong)
        + [COVID] * covid_a
        + [NORMAL] * 40
        + [COVID] * 10
    )
    groups = pd.DataFrame({"source": ["A"] * (non_covid_a + covid_a) + ["B"] * 50})
    return one_hot_probs(y_pred), np.array(y_true), groups


FLAG_A = "source=A (n=12): COVID specificity 0.50 (5/10, 95% CI 0.24–0.76) vs 0.90 overall"


def test_subgroup_flagged_when_specificity_far_below_overall():
    probs, y, groups = _flag_case(10)
    report = evaluate_predictions(probs, y, groups)
    assert report.covid_specificity == pytest.approx(0.9)
    a = report.subgroups["source"]["A"]
    b = report.subgroups["source"]["B"]
    assert a.n == 12 and a.covid_specificity == pytest.approx(0.5) and a.n_non_covid == 10
    assert a.covid_recall == pytest.approx(1.0)
    assert a.flagged and "specificity" in a.flag_reason and "sensitivity" not in a.flag_reason
    assert "0.50" in a.flag_reason and "0.90" in a.flag_reason
    assert not b.flagged and b.covid_specificity == pytest.approx(1.0)
    assert report.flagged == [FLAG_A]


def test_small_subgroup_not_flagged():
    probs, y, groups = _flag_case(8, covid_a=1)
    report = evaluate_predictions(probs, y, groups)
    a = report.subgroups["source"]["A"]
    assert a.n == 9 and a.covid_specificity == pytest.approx(0.5)
    assert not a.flagged and a.flag_reason is None
    assert report.flagged == []


def test_flag_on_sensitivity_and_undefined_figures_skipped():
    # source C: 10 covid, 2 found (sensitivity 0.2, specificity undefined)
    # source D: 30 covid all found, 10 normal all right
    y_true = [COVID] * 10 + [COVID] * 30 + [NORMAL] * 10
    y_pred = [COVID] * 2 + [PNEUMONIA] * 8 + [COVID] * 30 + [NORMAL] * 10
    groups = pd.DataFrame({"source": ["C"] * 10 + ["D"] * 40})
    report = evaluate_predictions(one_hot_probs(y_pred), np.array(y_true), groups)
    c = report.subgroups["source"]["C"]
    assert c.covid_specificity is None and c.covid_recall == pytest.approx(0.2)
    assert c.flagged and c.flag_reason == (
        "COVID sensitivity 0.20 (2/10, 95% CI 0.06–0.51) vs 0.80 overall"
    )


def test_unknown_values_missing_columns_and_adult():
    y_true = [COVID, NORMAL, PNEUMONIA, NORMAL, COVID, NORMAL]
    y_pred = [COVID, NORMAL, NORMAL, NORMAL, PNEUMONIA, COVID]
    groups = pd.DataFrame(
        {
            "source": ["x", None, float("nan"), "", "x", pd.NA],
            "age_group": ["adult", "child", None, "Adult", "adult", "child"],
            "other": list("abcdef"),
        },
        index=[10, 11, 12, 13, 14, 15],  # index is ignored; row order is what counts
    )
    report = evaluate_predictions(one_hot_probs(y_pred), np.array(y_true), groups)
    assert set(report.subgroups) == {"source", "age_group"}  # 'view' absent, 'other' not asked
    source = report.subgroups["source"]
    assert list(source) == ["x", "unknown"]
    assert source["unknown"].n == 4 and source["x"].n == 2
    assert source["x"].covid_specificity is None  # no non-covid images in the group
    assert report.subgroups["age_group"]["unknown"].n == 1
    adult = report.adult
    assert adult is not None and adult.n == 3  # 'adult' x2 and 'Adult'
    assert adult.accuracy == pytest.approx(2 / 3)
    assert adult.covid_recall == pytest.approx(0.5)
    assert adult.covid_specificity == pytest.approx(1.0)


def test_no_groups_means_no_subgroups_and_no_adult():
    report = evaluate_predictions(one_hot_probs(Y_PRED), np.array(Y_TRUE))
    assert report.subgroups == {} and report.adult is None and report.flagged == []


def test_input_validation():
    with pytest.raises(ValueError):
        evaluate_predictions(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(ValueError):
        evaluate_predictions(one_hot_probs([0, 1]), np.array([0]))
    with pytest.raises(ValueError):
        evaluate_predictions(one_hot_probs([0, 1]), np.array([0, 1]), pd.DataFrame({"x": [1]}))
    with pytest.raises(ValueError):
        evaluate_predictions(one_hot_probs([0, 1], num_classes=4), np.array([0, 1]))


def test_to_json_keys_and_serialisable():
    probs, y, groups = _flag_case(10)
    groups["age_group"] = ["adult"] * 20 + ["child"] * 42
    out = evaluate_predictions(probs, y, groups).to_json()
    rates = {"accuracy", "covid_recall", "covid_specificity"}
    assert set(out) == {
        *rates,
        *{f"{r}_ci" for r in rates},
        "n_covid",
        "n_non_covid",
        "macro_f1",
        "per_class",
        "ece",
        "confusion",
        "subgroups",
        "n",
        "classes",
        "flagged",
        "adult",
    }
    assert set(out["per_class"]) == set(CLASSES)
    assert set(out["per_class"]["covid"]) == {
        "precision",
        "recall",
        "f1",
        "support",
        "precision_ci",
        "recall_ci",
    }
    subgroup_keys = {*rates, *{f"{r}_ci" for r in rates}, "n", "n_covid", "n_non_covid"}
    entry = out["subgroups"]["source"]["A"]
    assert set(entry) == subgroup_keys
    assert set(out["adult"]) == subgroup_keys
    assert out["adult"]["n"] == 20
    back = json.loads(json.dumps(out))
    assert back["confusion"] == out["confusion"] and math.isclose(back["ece"], out["ece"])
    # the full model round-trips too
    report = evaluate_predictions(probs, y, groups)
    assert EvalReport.model_validate_json(report.model_dump_json()) == report


def test_confusion_png_is_valid(tmp_path):
    probs, y, groups = _flag_case(10)
    report = evaluate_predictions(probs, y, groups)
    buf = io.BytesIO()
    confusion_png(report, buf)
    assert buf.getvalue().startswith(b"\x89PNG\r\n\x1a\n")
    buf.seek(0)
    with Image.open(buf) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    path = tmp_path / "confusion.png"
    confusion_png(report, path, title="test split")
    with Image.open(path) as im:
        im.verify()


def test_render_text_and_markdown():
    probs, y, groups = _flag_case(10)
    groups["age_group"] = ["adult"] * 20 + ["child"] * 42
    report = evaluate_predictions(probs, y, groups)
    console = Console(record=True, width=160)
    console.print(render_text(report, title="test split"))
    text = console.export_text()
    for name in CLASSES:
        assert name in text
    assert "test split" in text
    assert "⚠ A" in text and "COVID specificity 0.50 (5/10, 95% CI 0.24–0.76) vs 0.90" in text
    assert "Adult only (n=20)" in text
    assert "By source" in text and "By age_group" in text

    md = per_class_table_markdown(report)
    assert "| class | precision | recall | F1 | support |" in md
    assert "| covid | 0.706 [0.47, 0.87] | 1.000 [0.76, 1.00] |" in md  # 12/17 and 12/12
    assert "| covid |" in md and "| pneumonia |" in md and "| normal |" in md
    assert "### Subgroups" in md and "**By source**" in md
    assert f"- {FLAG_A}" in md


def test_render_without_subgroups_warns():
    report = evaluate_predictions(one_hot_probs(Y_PRED), np.array(Y_TRUE))
    console = Console(record=True, width=120)
    console.print(render_text(report))
    assert "No subgroup columns were given" in console.export_text()
    assert "No subgroup columns were given" in per_class_table_markdown(report)
