"""Outputs a hospital can trust: calibration, the scoring version and the input gate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tinymodels import tiny_lite0

from covidray.calibration import Calibration, fit_calibration
from covidray.gate import Gate, GateStats, fit_gate, ledoit_wolf, metadata_reason
from covidray.modeldir import ModelCard, load_model_dir, save_model_dir
from covidray.models import build_model
from covidray.predict import Predictor

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---------------------------------------------------------------------------- calibration


def test_temperature_recovered_from_over_confident_logits() -> None:
    rng = np.random.default_rng(0)
    true = rng.normal(size=(3000, 3)) * 2.0
    probs = torch.softmax(torch.tensor(true), 1).numpy()
    labels = np.array([rng.choice(3, p=p) for p in probs])
    cal = fit_calibration(true * 2.5, labels, fitted_on="synthetic")  # over-confident by 2.5
    assert cal.method == "temperature"  # vector scaling does not beat it: no reason to use it
    assert cal.temperature == pytest.approx(2.5, rel=0.08)
    assert cal.nll_after < cal.nll_before
    z = torch.tensor(true * 2.5)
    assert torch.equal(cal.apply(z).argmax(1), z.argmax(1))  # labels unchanged


def test_vector_scaling_only_when_it_clearly_wins() -> None:
    rng = np.random.default_rng(1)
    true = rng.normal(size=(3000, 3)) * 2.0
    labels = np.array([rng.choice(3, p=p) for p in torch.softmax(torch.tensor(true), 1).numpy()])
    skewed = true * np.array([4.0, 1.0, 0.5]) + np.array([2.0, 0.0, -1.0])  # per-class distortion
    assert fit_calibration(skewed, labels, fitted_on="synthetic").method == "vector"


# ------------------------------------------------------------------------------- the gate


@pytest.mark.parametrize(
    ("tags", "reason"),
    [
        ({"modality": "CT", "body_part": "CHEST", "view": None}, "modality:CT"),
        ({"modality": "SC"}, "modality:SC"),
        ({"modality": "OT"}, "modality:OT"),
        ({"modality": "DX", "view": "LL"}, "view:LL"),
        ({"modality": "CR", "view": "LATERAL"}, "view:LATERAL"),
        ({"modality": "DX", "view": "RLD"}, "view:RLD"),
        ({"modality": "DX", "body_part": "ABDOMEN"}, "body_part:ABDOMEN"),
        ({"modality": "DX", "body_part": "THORAX", "view": "PA"}, None),
        ({"modality": "CR", "body_part": "CHEST", "view": "AP"}, None),
        ({"modality": None, "body_part": None, "view": None}, None),  # missing: no reason
        ({}, None),
    ],
)
def test_metadata_layer(tags: dict, reason: str | None) -> None:
    assert metadata_reason(tags) == reason


def test_dicom_headers_are_gated_with_their_reason() -> None:
    from oddfiles import dicom_bytes

    from covidray.dicom_meta import dicom_tags

    pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    cases = {
        "CT": dict(Modality="CT"),
        "SC": dict(Modality="SC"),
        "lateral": dict(ViewPosition="LL"),
        "decubitus": dict(ViewPosition="LLD"),
        "abdomen": dict(BodyPartExamined="ABDOMEN"),
    }
    reasons = {k: metadata_reason(dicom_tags(dicom_bytes(pixels, **v))) for k, v in cases.items()}
    assert reasons == {
        "CT": "modality:CT",
        "SC": "modality:SC",
        "lateral": "view:LL",
        "decubitus": "view:LLD",
        "abdomen": "body_part:ABDOMEN",
    }
    assert metadata_reason(dicom_tags(dicom_bytes(pixels))) is None  # DX, CHEST, PA
    missing = dicom_bytes(pixels, Modality="", BodyPartExamined="", ViewPosition="")
    assert metadata_reason(dicom_tags(missing)) is None


def test_ledoit_wolf_and_mahalanobis() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 300))  # fewer samples than dimensions: shrinkage needed
    cov, shrinkage = ledoit_wolf(x)
    assert 0 < shrinkage <= 1 and np.all(np.linalg.eigvalsh(cov) > 0)
    stats, _ = GateStats.fit(x)
    near, far = stats.score(x[:5]), stats.score(x[:5] + 3.0)
    assert np.all(far > near)
    again = GateStats.from_bytes(stats.to_bytes())
    np.testing.assert_allclose(again.score(x[:5]), near)


# ------------------------------------------------------------- cards and scoring versions


def test_model_dir_from_before_calibration_loads_with_temperature_one(tmp_path) -> None:
    model = tiny_lite0()
    card = save_model_dir(model, ModelCard.for_model(model, 64), str(tmp_path))
    raw = json.loads((tmp_path / "model_card.json").read_text())
    for key in ("calibration", "gate", "lineage"):  # a card as the previous release wrote it
        raw.pop(key)
    raw["schema_version"] = 1
    for key in ("shorter_side", "bit_depth", "shorter_side_resample", "square_resize"):
        raw["preprocessing"].pop(key)
    (tmp_path / "model_card.json").write_text(json.dumps(raw))
    _, old = load_model_dir(str(tmp_path))
    assert old.calibration is None and old.effective_calibration.temperature == 1.0
    assert "before calibration" in old.effective_calibration.note
    assert old.model_version == card.model_version
    p = Predictor.from_dir(str(tmp_path), device="cpu", threads=1)
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        expected = model(x).softmax(1).numpy()
    res = p.predict(x, with_cam=False)
    np.testing.assert_allclose(res.probs, expected, atol=1e-5)  # no TTA, T = 1: the raw model
    assert res.in_scope.all() and res.ood_score is None


def test_scoring_version_covers_what_changes_outputs(tmp_path) -> None:
    model = tiny_lite0()
    base = ModelCard.for_model(model, 64)
    v0 = save_model_dir(model, base, str(tmp_path / "a")).scoring_version
    warm = base.model_copy(update={"calibration": Calibration(temperature=1.7)})
    v1 = save_model_dir(model, warm, str(tmp_path / "b")).scoring_version
    tta = base.model_copy(update={"tta_hflip": True})
    v2 = save_model_dir(model, tta, str(tmp_path / "c")).scoring_version
    feats = np.random.default_rng(0).normal(size=(40, 1280))
    gate, stats = fit_gate(feats, feats[:10], np.zeros((10, 3)))
    gated = save_model_dir(
        model,
        base.model_copy(update={"gate": gate}),
        str(tmp_path / "d"),
        gate_stats=stats.to_bytes(),
    )
    assert len({v0, v1, v2, gated.scoring_version}) == 4
    assert isinstance(gated.gate, Gate) and gated.gate.stats_sha256
    p = Predictor.from_dir(str(tmp_path / "d"), device="cpu", threads=1)
    assert p.gate is not None and p.gate_stats is not None
    (tmp_path / "d" / "gate.safetensors").write_bytes(b"tampered")
    from covidray.modeldir import ModelLoadError

    with pytest.raises(ModelLoadError, match="does not match"):
        Predictor.from_dir(str(tmp_path / "d"), device="cpu", threads=1)


# ------------------------------------------------- the nightly job and the scoring version


def _scored(out: str) -> dict[str, list[float]]:
    from covidray.labels import CLASSES
    from covidray.score import read_predictions

    rows = read_predictions(out, dedupe=True).to_pylist()
    return {r["image_id"]: [r[f"prob_{c}"] for c in CLASSES] for r in rows if r["image_id"]}


@pytest.mark.usefixtures("ray_cluster")
def test_new_temperature_rescores_and_matches_evaluate(tmp_path) -> None:
    """A calibrated model: the nightly job and ``evaluate`` give the same calibrated
    probabilities; a new temperature is a new scoring version, so the job scores again."""
    from covidray.config import IngestConfig
    from covidray.dataset import load_rows
    from covidray.evaluation.evaluate import predict_rows
    from covidray.ingest import ingest
    from covidray.score import ScoreConfig, run_score
    from covidray.synth import write_phantoms

    write_phantoms(str(tmp_path / "raw"), n_per_class=4, seed=3, size=64)
    ds = str(tmp_path / "ds")
    ingest(IngestConfig(src=str(tmp_path / "raw"), dest=ds, size=64))
    model = tiny_lite0(2)
    card = ModelCard.for_model(model, 64, 64, tta_hflip=True)
    hot = card.model_copy(update={"calibration": Calibration(temperature=1.8)})
    save_model_dir(model, hot, str(tmp_path / "m"))
    out = str(tmp_path / "scores")
    first = run_score(ScoreConfig(model=str(tmp_path / "m"), data=ds, out=out, read_chunk=8))
    assert first.n_scored == 12 and first.n_skipped == 0

    rows = load_rows(ds)
    res = predict_rows(Predictor.from_dir(str(tmp_path / "m"), device="cpu", threads=1), rows)
    evaluated = dict(zip(rows["image_id"], res.probs.tolist(), strict=True))
    scored = _scored(out)
    assert scored.keys() == evaluated.keys()
    for image_id, probs in evaluated.items():
        np.testing.assert_allclose(scored[image_id], probs, atol=1e-4)

    again = run_score(ScoreConfig(model=str(tmp_path / "m"), data=ds, out=out, read_chunk=8))
    assert again.n_scored == 0 and again.n_skipped == 12  # nothing changed: nothing rescored
    cooler = card.model_copy(update={"calibration": Calibration(temperature=1.2)})
    saved = save_model_dir(model, cooler, str(tmp_path / "m"))  # same weights, same directory
    third = run_score(ScoreConfig(model=str(tmp_path / "m"), data=ds, out=out, read_chunk=8))
    assert third.scoring_version == saved.scoring_version != first.scoring_version
    assert third.model_version == first.model_version
    assert third.n_scored == 12 and third.n_skipped == 0


# ---------------------------------------------- the image layer on real and out-of-scope films


@pytest.fixture(scope="module")
def gated_model(tmp_path_factory, shared_cxr):
    """ImageNet Lite0 (a random head: the gate looks at the backbone's features) with its
    calibration and gate fitted on the shared X-rays' train and val splits, at 224 px."""
    from covidray.config import IngestConfig
    from covidray.dataset import load_rows
    from covidray.ingest import ingest
    from covidray.posthoc import fit_outputs

    root = tmp_path_factory.mktemp("gated")
    ds = str(root / "ds")
    ingest(IngestConfig(src=str(shared_cxr), dest=ds, parallel_threshold=10**9))
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", weights="imagenet").eval()
    card = ModelCard.for_model(model, 224, 256, tta_hflip=True)
    fitted = fit_outputs(model, card, load_rows(ds), device="cpu", batch_size=64)
    uri = str(root / "model")
    save_model_dir(model, fitted.card, uri, gate_stats=fitted.gate_stats)
    return uri, ds


def test_image_gate_refuses_ct_and_photographs_and_passes_chest_films(gated_model) -> None:
    from covidray.dataset import load_rows
    from covidray.evaluation.evaluate import select_split
    from covidray.evaluation.gate_eval import PHOTOGRAPHS, evaluate_gate, shared_ood, skimage_images
    from covidray.storage import read_bytes

    uri, ds = gated_model
    predictor = Predictor.from_dir(uri, device="cpu")
    test = select_split(load_rows(ds), "test")
    kinds = {**shared_ood(SHARED / "ood"), "photograph": skimage_images(PHOTOGRAPHS)}
    figures = evaluate_gate(predictor, [read_bytes(u) for u in test["uri"]], kinds)
    print(figures.model_dump_json(indent=1))
    assert figures.kinds["ct"].rejection_rate >= 0.9
    assert figures.kinds["photograph"].rejection_rate >= 0.9
    assert figures.kinds["ct"].auroc >= 0.95 and figures.kinds["photograph"].auroc >= 0.95
    assert figures.false_rejection_rate <= 0.10  # 5 % on val; 104 test films: a wider margin


@pytest.mark.usefixtures("ray_cluster")
def test_nightly_job_marks_the_out_of_scope_folder(gated_model, tmp_path) -> None:
    from covidray.score import ScoreConfig, read_predictions, run_score

    uri, _ = gated_model
    result = run_score(
        ScoreConfig(model=uri, data=str(SHARED / "ood" / "images"), out=str(tmp_path), read_chunk=8)
    )
    rows = read_predictions(str(tmp_path)).to_pylist()
    assert len(rows) == 35 and result.n_out_of_scope == sum(not r["in_scope"] for r in rows)
    refused = [r for r in rows if r["in_scope"] is False]
    assert len(refused) >= 0.9 * len(rows)
    assert all(r["label"] is None and r["status"] == "out_of_scope" for r in refused)
    assert all(r["prob_covid"] is not None for r in refused)  # scores kept: the image layer
    assert {r["gate_reason"] for r in refused} == {"ood_image"}
