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


def test_calibrated_logits_keep_temperature_one() -> None:
    """Logits calibrated already, 90 films (a validation split's size): a fitted temperature
    rarely beats T = 1 out of sample, and then none is applied (the card says why); over-
    confident ones always get theirs."""
    kept = 0
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        true = rng.normal(size=(90, 3)) * 2.0
        probs = torch.softmax(torch.tensor(true), 1).numpy()
        labels = np.array([rng.choice(3, p=p) for p in probs])
        cal = fit_calibration(true, labels, fitted_on="synthetic")
        if cal.note:
            assert cal.cv_nll["temperature"] >= cal.cv_nll["none"] == cal.nll_before
            assert cal.temperature == 1.0 and cal.nll_after == cal.nll_before
            assert "did not beat T = 1" in cal.note
            kept += 1
        hot = fit_calibration(true * 2.5, labels, fitted_on="synthetic")
        assert not hot.note and hot.cv_nll["temperature"] < hot.cv_nll["none"]
    assert kept >= 6


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
    stats, _ = GateStats.fit(x, (300,))
    near, far = stats.distances(x[:5]), stats.distances(x[:5] + 3.0)
    assert near.shape == (5, 1) and np.all(far > near)
    d = x[:5] - x.mean(0)  # the distance is the textbook one
    expected = np.sqrt(np.einsum("bi,ij,bj->b", d, np.linalg.inv(cov), d))
    np.testing.assert_allclose(near[:, 0], expected, rtol=1e-9)
    again = GateStats.from_bytes(stats.to_bytes())
    np.testing.assert_allclose(again.distances(x[:5]), near)


def test_several_layers_are_standardised_on_val_and_summed() -> None:
    """Two feature layers side by side: one distance per layer, each standardised by its
    val mean and spread, summed; the threshold refuses at most 5 % of the val films, and a
    shift in either layer alone raises the score."""
    rng = np.random.default_rng(3)
    train, val = rng.normal(size=(300, 12)), rng.normal(size=(100, 12))
    gate, stats = fit_gate(train, val, layers=("a", "b"), dims=(4, 8))
    assert gate.feature_layers == ("a", "b") and gate.dims == (4, 8) and len(gate.shrinkage) == 2
    dist = stats.distances(val)
    assert dist.shape == (100, 2)
    z = (dist - dist.mean(0)) / dist.std(0)
    np.testing.assert_allclose(gate.score(dist), z.sum(1), rtol=1e-9)
    assert np.mean(gate.score(dist) > gate.threshold) <= 0.05
    for cols in (slice(0, 4), slice(4, 12)):
        shifted = val[:20].copy()
        shifted[:, cols] += 4.0
        assert np.all(gate.score(stats.distances(shifted)) > gate.score(dist[:20]))
    again = GateStats.from_bytes(stats.to_bytes())
    np.testing.assert_allclose(again.distances(val), dist)
    with pytest.raises(ValueError, match="shape"):
        stats.distances(val[:, :10])


def test_one_layer_gate_from_before_several_layers_scores_unchanged() -> None:
    """A card and statistics file as the one-layer gate wrote them: the raw distance, the
    same threshold."""
    from safetensors.numpy import save

    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 16))
    cov, shrinkage = ledoit_wolf(x)
    old = {
        "method": "mahalanobis",
        "feature_layer": "pool",
        "threshold": 5.0,
        "energy_threshold": -1.2,
        "shrinkage": shrinkage,
        "dim": 16,
        "fitted_on": "train (200 images); threshold on val (50)",
        "val_rejection": 0.05,
        "val_scores": {"mahalanobis": (4.0, 1.0), "energy": (-2.0, 0.5)},
        "combined_threshold": 2.9,
        "stats_file": "gate.safetensors",
        "stats_sha256": "",
    }
    gate = Gate.model_validate(old)
    assert gate.feature_layers == ("pool",) and gate.dims == (16,) and gate.layer_scale is None
    assert "energy_threshold" not in gate.model_dump()  # recorded, never used: dropped
    stats = GateStats.from_bytes(save({"mean": x.mean(0), "precision": np.linalg.inv(cov)}))
    d = x[:7] - x.mean(0)
    expected = np.sqrt(np.einsum("bi,ij,bj->b", d, np.linalg.inv(cov), d))
    np.testing.assert_allclose(gate.score(stats.distances(x[:7])), expected, rtol=1e-9)


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
    model_layers = ("features.blocks.3", "pool")
    probe = Predictor(model, base, device="cpu", threads=1, gate_layers=model_layers)
    dims = probe.predict(torch.rand(2, 1, 64, 64), with_cam=False, return_features=True)
    assert probe.feature_layers == model_layers and dims.feature_dims is not None
    feats = np.random.default_rng(0).normal(size=(40, sum(dims.feature_dims)))
    gate, stats = fit_gate(feats, feats[:10], layers=model_layers, dims=dims.feature_dims)
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
    calibration and gate fitted on the shared X-rays' train and val splits, and its view
    check on ``../shared/data/views`` plus the training split, at 224 px."""
    from covidray.config import IngestConfig
    from covidray.dataset import load_rows, load_view_rows
    from covidray.ingest import ingest
    from covidray.posthoc import fit_outputs

    if not (SHARED / "views" / "manifest.csv").exists():
        pytest.skip("no ../shared/data/views")
    root = tmp_path_factory.mktemp("gated")
    ds, views = str(root / "ds"), str(root / "views")
    ingest(IngestConfig(src=str(shared_cxr), dest=ds, parallel_threshold=10**9))
    ingest(IngestConfig(src=str(SHARED / "views"), dest=views, parallel_threshold=10**9))
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", weights="imagenet").eval()
    card = ModelCard.for_model(model, 224, 256, tta_hflip=True)
    fitted = fit_outputs(
        model, card, load_rows(ds), device="cpu", batch_size=64, view_rows=load_view_rows(views)
    )
    uri = str(root / "model")
    save_model_dir(
        model, fitted.card, uri, gate_stats=fitted.gate_stats, view_stats=fitted.view_stats
    )
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
    # The view check (fitted on ../shared/data/views, never on ../shared/data/ood): its
    # cross-validated figures (folds by patient) and the evaluation set's laterals.
    cv = predictor.card.view_check.cv
    assert cv["view_set_frontals_refused"][0] == 0 and cv["other_frontals_refused"][0] <= 2
    assert cv["laterals_refused"][0] >= 18 and cv["laterals_refused"][1] == 23
    assert figures.kinds["lateral"].rejected >= 9 and figures.view_check


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
    assert {r["gate_reason"] for r in refused} <= {"ood_image", "image_view:lateral"}
    assert all(r["gate_reason"] == "ood_image" for r in refused if "/ct/" in r["uri"])


# ------------------------------------------------------------------ the gate's feature layers


def test_feature_layers_are_the_pooled_outputs_of_the_named_modules() -> None:
    """Several layers in one forward pass: each the spatial mean of that module's output in
    the plain model (no folding, no channels_last), side by side in the order asked."""
    from covidray.predict import trunk_stages

    model = tiny_lite0(5)
    layers = ("features.blocks.3", "pool", "features.bn1")
    p = Predictor(
        model, ModelCard.for_model(model, 64), device="cpu", threads=1, gate_layers=layers
    )
    x = torch.rand(3, 1, 64, 64)
    res = p.predict(x, with_cam=True, return_features=True)
    seen = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, out, n=n: seen.__setitem__(n, out.mean((2, 3)) if out.ndim == 4 else out)
        )
        for n in layers
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    expected = torch.cat([seen[n] for n in layers], 1).numpy()
    assert res.feature_dims == (80, 1280, 32)
    np.testing.assert_allclose(res.features, expected, rtol=1e-3, atol=1e-4)
    assert "features.blocks.3" in trunk_stages(model) and "features.conv_head" in trunk_stages(
        model
    )
    with pytest.raises(ValueError, match="no layer 'features.nope'.*features.blocks.0"):
        Predictor(
            model, ModelCard.for_model(model, 64), device="cpu", gate_layers=["features.nope"]
        )
    with pytest.raises(ValueError, match="BatchNorm folded into it"):
        Predictor(
            model, ModelCard.for_model(model, 64), device="cpu", gate_layers=["features.conv_head"]
        )


def test_calibrate_fits_a_multi_layer_gate_from_the_command_line(tmp_path, capsys) -> None:
    """``covidray calibrate --gate-layer A --gate-layer B``: the card names both layers, the
    statistics file holds one block each, ``evaluate`` reports the refusals by class, and a
    layer the model does not have is one error line."""
    import json

    from covidray.cli import main
    from covidray.config import IngestConfig, SplitConfig
    from covidray.ingest import ingest
    from covidray.synth import write_phantoms

    write_phantoms(str(tmp_path / "raw"), n_per_class=10, seed=4, size=64)
    ds = str(tmp_path / "ds")
    ingest(IngestConfig(src=str(tmp_path / "raw"), dest=ds, size=64, split=SplitConfig(seed=8)))
    save_model_dir(tiny_lite0(3), ModelCard.for_model(tiny_lite0(3), 64, 64), str(tmp_path / "m"))
    argv = ["calibrate", "--model", str(tmp_path / "m"), "--data", ds]
    assert main([*argv, "--gate-layer", "features.blocks.4", "--gate-layer", "pool"]) == 0
    capsys.readouterr()
    _, card = load_model_dir(str(tmp_path / "m"))
    assert card.gate is not None and card.gate.feature_layers == ("features.blocks.4", "pool")
    assert card.gate.dims == (112, 1280) and card.gate.layer_scale is not None
    p = Predictor.from_dir(str(tmp_path / "m"), device="cpu", threads=1)
    assert p.gate_stats is not None and p.gate_stats.dims == (112, 1280)

    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tmp_path / "m"),
                "--data",
                ds,
                "--split",
                "val",
                "--format",
                "json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_label = report["false_rejections_by"]["label"]
    assert sum(n for _, n in by_label.values()) == report["n"]
    assert sum(k for k, _ in by_label.values()) == round(
        report["false_rejection_rate"] * report["n"]
    )

    assert main([*argv, "--gate-layer", "features.nope"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no layer 'features.nope'" in err
