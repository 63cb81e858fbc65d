"""The input gate's view check (metadata → image distance → view check): fitting with
patient-grouped cross-validation, the Predictor's verdicts in that order, the model
directory (parameters, digest, scoring version; old cards unchanged) and ``covidray
calibrate --views`` (with the fixed Grad-CAM scale fitted beside it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tinymodels import tiny_lite0
from viewfilms import write_view_set

from covidray.calibration import Calibration
from covidray.gate import fit_gate, metadata_reason
from covidray.modeldir import (
    ModelCard,
    ModelLoadError,
    Preprocessing,
    load_model_dir,
    save_model_dir,
)
from covidray.predict import Predictor
from covidray.viewcheck import (
    LATERAL_REASON,
    ViewCheck,
    ViewWeights,
    fit_view_check,
    patient_folds,
    view_class,
)


@pytest.mark.parametrize(
    ("view", "cls"),
    [
        ("L", "lateral"),
        ("LL", "lateral"),
        ("Lateral", "lateral"),
        ("PA", "frontal"),
        ("AP", "frontal"),
        ("AP Supine", "frontal"),
        ("AP_SUPINE", "frontal"),
        ("", None),
        (None, None),
        ("LLD", None),
    ],
)
def test_view_labels_from_a_manifest_or_header(view, cls) -> None:
    assert view_class(view) == cls


def test_metadata_refuses_an_ieee8023_lateral_header() -> None:
    assert metadata_reason({"view": "L"}) == "view:L"
    assert metadata_reason({"view": "AP Supine"}) is None


def _view_features(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """60 frontal and 12 lateral rows, 20 dims, the view in two of them, 6 patients with both
    views (the view set) and 50 with a frontal film only."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(72, 20))
    lateral = np.r_[np.zeros(60, bool), np.ones(12, bool)]
    x[lateral, :2] += 6.0
    patients = [f"p{i}" for i in range(50)] + [f"v{i % 6}" for i in range(22)]
    in_view = np.r_[np.zeros(50, bool), np.ones(22, bool)]
    return x, lateral, patients, in_view


def test_fit_view_check_cross_validates_by_patient() -> None:
    x, lateral, patients, in_view = _view_features()
    check, weights = fit_view_check(x, lateral, patients, in_view, layers=("pool",))
    assert check.cv["laterals_refused"] == (12, 12)
    assert check.cv["view_set_frontals_refused"] == (0, 10)
    assert check.cv["other_frontals_refused"] == (0, 50)
    assert check.dims == (20,) and check.l2 in (0.01, 0.1, 1.0, 10.0)
    assert "12 lateral and 60 frontal films of 56 patients" in check.fitted_on
    p = weights.lateral_probability(x)
    assert (p[lateral] > 0.5).all() and (p[~lateral] < 0.5).all()
    again = ViewWeights.from_bytes(weights.to_bytes())
    np.testing.assert_array_equal(again.lateral_probability(x), p)
    refit, _ = fit_view_check(x, lateral, patients, in_view, layers=("pool",))
    assert refit == check  # deterministic
    with pytest.raises(ValueError, match="at least 5 lateral"):
        fit_view_check(x[:62], lateral[:62], patients[:62], in_view[:62])


def test_patient_folds_keep_a_patient_in_one_fold() -> None:
    _, lateral, patients, _ = _view_features()
    folds = patient_folds(patients, lateral)
    for p in set(patients):
        assert len({f for f, q in zip(folds, patients, strict=True) if q == p}) == 1
    assert len(set(folds[lateral])) == 5  # every fold holds laterals


def _tiny_gated(
    tmp_path: Path, intercept: float, threshold: float | None = None
) -> tuple[str, torch.Tensor, torch.Tensor]:
    """A tiny model directory with a gate fitted on noise films (``threshold``: its own
    instead) and a view check whose intercept decides (coefficients 0): ``+`` calls every
    film lateral, ``-`` none."""
    model = tiny_lite0(1)
    card = ModelCard.for_model(model, 64, 64)
    probe = Predictor(model, card, device="cpu", threads=1)
    films = torch.rand(40, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    res = probe.predict(films, with_cam=False, return_features=True)
    gate, stats = fit_gate(res.features[:30], res.features[30:])
    if threshold is not None:
        gate = gate.model_copy(update={"threshold": threshold})
    check = ViewCheck(dims=(1280,), l2=1.0, fitted_on="by hand", cv={})
    weights = ViewWeights(np.zeros(1280), np.ones(1280), np.zeros(1280), intercept)
    fitted = card.model_copy(update={"gate": gate, "view_check": check})
    uri = str(tmp_path / f"m{intercept:+.0f}")
    save_model_dir(model, fitted, uri, gate_stats=stats.to_bytes(), view_stats=weights.to_bytes())
    far = torch.zeros(4, 1, 64, 64)
    far[:, :, ::2] = 1.0  # stripes: nothing like the noise films
    return uri, films[:8], far


def test_view_check_refuses_after_the_distance_and_reports_its_reason(tmp_path) -> None:
    uri, films, far = _tiny_gated(tmp_path, intercept=5.0)
    p = Predictor.from_dir(uri, device="cpu", threads=1)
    assert p.view is not None and p.feature_layers == ("pool",)
    res = p.predict(torch.cat([films, far]), with_cam=False)
    reasons = res.gate_reason
    # The distance first: the stripes are ood_image, every film it passes is lateral here.
    assert reasons[8:] == ["ood_image"] * 4
    assert set(reasons[:8]) <= {"ood_image", LATERAL_REASON} and LATERAL_REASON in reasons
    assert not res.in_scope.any() and res.labels == [None] * 12
    assert res.lateral_prob is not None and (res.lateral_prob > 0.99).all()
    assert res[0].to_dict()["lateral_prob"] == pytest.approx(res.lateral_prob[0])

    none_lateral, films, _ = _tiny_gated(tmp_path, intercept=-5.0)
    q = Predictor.from_dir(none_lateral, device="cpu", threads=1)
    assert LATERAL_REASON not in q.predict(films, with_cam=False).gate_reason

    _, card = load_model_dir(uri)
    assert card.view_check is not None and len(card.view_check.stats_sha256) == 64
    (Path(uri) / "view.safetensors").write_bytes(b"tampered")
    with pytest.raises(ModelLoadError, match="does not match"):
        Predictor.from_dir(uri, device="cpu", threads=1)


@pytest.mark.usefixtures("ray_cluster")
def test_nightly_rows_keep_the_header_view_and_the_image_verdict(tmp_path) -> None:
    """A DICOM whose header says PA but whose image the view check calls lateral: refused with
    ``image_view:lateral``, its row keeping the header's ``PA``; a header saying LL is refused
    by the metadata before any pixel is read."""
    from oddfiles import dicom_bytes

    from covidray.score import ScoreConfig, read_predictions, run_score

    uri, _, _ = _tiny_gated(tmp_path, intercept=5.0, threshold=1e9)
    folder = tmp_path / "in"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 4096, (64, 64)).astype(np.uint16)
    (folder / "pa.dcm").write_bytes(dicom_bytes(pixels, ViewPosition="PA"))
    (folder / "ll.dcm").write_bytes(dicom_bytes(pixels, ViewPosition="LL"))
    out = str(tmp_path / "scores")
    result = run_score(ScoreConfig(model=uri, data=str(folder), out=out, read_chunk=8))
    assert result.n_out_of_scope == 2
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in read_predictions(out).to_pylist()}
    pa_row, ll_row = rows["pa.dcm"], rows["ll.dcm"]
    assert (pa_row["gate_reason"], pa_row["view"], pa_row["in_scope"]) == (
        LATERAL_REASON,
        "PA",
        False,
    )
    assert pa_row["label"] is None and pa_row["prob_covid"] is not None
    assert (ll_row["gate_reason"], ll_row["view"]) == ("view:LL", "LL")


def test_scoring_version_of_cards_without_the_new_parts_is_unchanged() -> None:
    """The value main computed before the view check and the CAM scale were hashed; each of
    them, when set, changes it."""
    card = ModelCard(
        backbone="efficientnet_lite0",
        num_classes=3,
        head="paper",
        architecture={"backbone": "efficientnet_lite0", "num_classes": 3},
        preprocessing=Preprocessing(
            input_size=64, normalization={"mean": [0.5] * 3, "std": [0.25] * 3}
        ),
        weights_sha256="ab" * 32,
        model_version="ab" * 6,
        tta_hflip=True,
        calibration=Calibration(temperature=1.5),
    )
    assert card.scoring_version == "d3ab2f3abf57"
    scaled = card.model_copy(update={"cam_covid_scale": 0.42})
    viewed = card.model_copy(
        update={"view_check": ViewCheck(dims=(1280,), l2=1.0, fitted_on="x", cv={})}
    )
    versions = {card.scoring_version, scaled.scoring_version, viewed.scoring_version}
    assert len(versions) == 3
    other = scaled.model_copy(update={"cam_covid_scale": 0.5})
    assert other.scoring_version != scaled.scoring_version


def test_calibrate_with_views_fits_the_view_check_and_cam_scale(tmp_path, capsys) -> None:
    """``covidray ingest`` of a view set (unlabelled rows), then ``covidray calibrate --views``:
    the card has a view check (cross-validated figures, digest) and a CAM scale, the
    directory its parameters, ``evaluate`` counts refusals by reason; calibrating again
    without ``--views`` keeps the view check (same weights)."""
    from covidray.cli import main
    from covidray.config import IngestConfig, SplitConfig
    from covidray.ingest import ingest
    from covidray.synth import write_phantoms

    write_phantoms(str(tmp_path / "raw"), n_per_class=10, seed=4, size=64)
    ds = str(tmp_path / "ds")
    ingest(IngestConfig(src=str(tmp_path / "raw"), dest=ds, size=64, split=SplitConfig(seed=8)))
    views = str(tmp_path / "views")
    assert main(["ingest", write_view_set(tmp_path / "views_raw"), views, "--size", "64"]) == 0
    m = str(tmp_path / "m")
    save_model_dir(tiny_lite0(3), ModelCard.for_model(tiny_lite0(3), 64, 64), m)
    before = load_model_dir(m)[1].scoring_version
    capsys.readouterr()
    assert main(["calibrate", "--model", m, "--data", ds, "--views", views]) == 0
    said = capsys.readouterr()
    out = said.out + said.err
    assert "view check over features.blocks.5" in out and "COVID-19 Grad-CAM scale" in out
    _, card = load_model_dir(m)
    v = card.view_check
    assert v is not None and v.feature_layers == ("features.blocks.5",) and v.dims == (192,)
    assert (Path(m) / "view.safetensors").exists()
    assert v.cv["laterals_refused"][1] == 6 and v.cv["view_set_frontals_refused"][1] == 6
    assert "6 lateral" in v.fitted_on
    assert card.cam_covid_scale is not None and card.cam_covid_scale > 0
    assert card.scoring_version != before
    # The re-tuned distance (bench/gate_rule.py): the backbone's layers, 1 % of val refused.
    assert card.gate.feature_layers == ("pool", "features.blocks.5")
    assert card.gate.val_rejection == 0.01
    p = Predictor.from_dir(m, device="cpu", threads=1)
    assert p.view is not None and p.view_weights is not None

    argv = ["evaluate", "--model", m, "--data", ds, "--split", "val", "--format", "json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_reason = report["rejections_by_reason"]
    assert set(by_reason) <= {"ood_image", LATERAL_REASON}
    assert sum(by_reason.values()) == report["n_rejected"]

    assert main(["calibrate", "--model", m, "--data", ds]) == 0
    _, kept = load_model_dir(m)
    assert kept.view_check is not None and kept.view_check.stats_sha256 == v.stats_sha256
