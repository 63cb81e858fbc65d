"""Comparable maps across studies: the COVID-class Grad-CAM on a fixed scale per model.

The per-image map is normalised to its own maximum, so its area compares neither between
studies nor across a change of label. The nightly job stores the COVID-class map divided by
the model card's ``cam_covid_scale`` (the 99th percentile of that class's raw values on the
validation split) and its area; the report plots that area and says that localisation was not
validated on real films.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tinymodels import tiny_lite0

from covidray.codec import decode_png_u8, encode_png
from covidray.config import IngestConfig
from covidray.explain import GradCAM, normalize_cam
from covidray.ingest import ingest
from covidray.modeldir import ModelCard, read_card, save_model_dir
from covidray.synth import write_phantoms

SIZE = 64
COVID = 0


def tiny_model(seed: int = 1) -> torch.nn.Module:
    """Seed 1: its COVID-class maps are not all zero."""
    return tiny_lite0(seed)


def images(n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, 1, SIZE, SIZE), dtype=np.uint8))


def test_fit_cam_scale_is_the_quantile_of_raw_covid_maps() -> None:
    from covidray.explain import fit_cam_scale

    model, x = tiny_model(), images(6)
    scale = fit_cam_scale(model, x, COVID, batch_size=4)
    raw = GradCAM(model)(x.float() / 255, class_idx=COVID, upsample=False).raw
    assert scale == pytest.approx(float(np.quantile(raw.numpy().ravel(), 0.99)), rel=1e-4)
    assert scale > 0 and float(raw.max()) > 0


def test_fixed_scale_keeps_what_per_image_normalisation_erases() -> None:
    from covidray.explain import fixed_scale

    weak = torch.tensor([[[0.0, 0.1], [0.2, 0.4]]])
    strong = 2 * weak  # the same pattern, twice as strong: a worse film
    same = normalize_cam(torch.cat([weak, strong]))
    assert torch.equal(same[0], same[1])  # per image: indistinguishable
    fixed = fixed_scale(torch.cat([weak, strong]), scale=0.4)
    assert fixed[1].sum() > fixed[0].sum() and float(fixed.max()) == 1.0


@pytest.mark.usefixtures("ray_cluster")
def test_scoring_job_stores_the_fixed_scale_covid_map(tmp_path: Path) -> None:
    from covidray.dataset import load_images
    from covidray.explain import fit_cam_scale, fixed_class_maps
    from covidray.manifest import manifest_base, read_manifest
    from covidray.predict import Predictor
    from covidray.score import ScoreConfig, read_predictions, run_score

    write_phantoms(str(tmp_path / "raw"), n_per_class=2, seed=0, size=SIZE)
    ds = str(tmp_path / "ds")
    ingest(IngestConfig(src=str(tmp_path / "raw"), dest=ds, size=SIZE))
    manifest = read_manifest(ds).to_pandas()
    uris = [f"{manifest_base(ds)}/{u}" for u in manifest["uri"]]
    pixels = load_images(uris, SIZE)
    model = tiny_model()
    scale = fit_cam_scale(model, pixels, COVID)
    card = ModelCard.for_model(model, SIZE, SIZE, cam_covid_scale=scale)
    save_model_dir(model, card, str(tmp_path / "model"))
    assert read_card(str(tmp_path / "model")).cam_covid_scale == pytest.approx(scale)

    out = str(tmp_path / "scores")
    cfg = ScoreConfig(
        model=str(tmp_path / "model"), data=ds, out=out, batch_size=8, workers=1, threads=1
    )
    assert run_score(cfg).n_scored == len(manifest)
    t = read_predictions(out).to_pandas().set_index("image_id").loc[manifest["image_id"]]
    assert t["cam_covid_png"].notna().all() and t["cam_covid_area"].between(0, 1).all()

    p = Predictor.from_dir(str(tmp_path / "model"), device="cpu", threads=1)
    maps, area = fixed_class_maps(p.model, p.prepare(pixels), COVID, scale)
    stored = np.stack([decode_png_u8(b) for b in t["cam_covid_png"]])
    assert stored.shape == maps.shape
    assert np.abs(stored.astype(int) - maps.astype(int)).max() <= 1
    np.testing.assert_allclose(t["cam_covid_area"].to_numpy(), area, atol=0.01)
    assert len(set(np.round(t["cam_covid_area"], 4))) > 1  # on one scale, areas differ


def _rows(fixed_area: tuple[float, float] | None) -> pd.DataFrame:
    """One patient, two studies with the same per-image area; the fixed-scale areas differ."""
    cam = encode_png(np.array([[0, 128], [255, 64]], np.uint8))
    rows = pd.DataFrame(
        {
            "image_id": ["a" * 64, "b" * 64],
            "uri": ["image:" + "a" * 64, "image:" + "b" * 64],
            "patient_id": ["psn:0123456789abcdef0123"] * 2,
            "study_day": [0.0, 7.0],
            "study_date": [None, None],
            "prob_covid": [0.4, 0.8],
            "prob_pneumonia": [0.3, 0.1],
            "prob_normal": [0.3, 0.1],
            "label": ["covid", "covid"],
            "model_version": ["v" * 12] * 2,
            "cam_area": [0.3, 0.3],
            "cam_border_energy": [0.1, 0.1],
            "cam_png": [cam, cam],
            "scored_at": [datetime.now(UTC)] * 2,
        }
    )
    if fixed_area is not None:
        rows["cam_covid_area"] = list(fixed_area)
        rows["cam_covid_png"] = [cam, cam]
    return rows


def test_report_plots_the_fixed_scale_area_and_states_the_caveat(tmp_path: Path) -> None:
    from scorefiles import to_table

    from covidray.report import ReportConfig, build_report
    from covidray.report.progression import timeline_png
    from covidray.score.results import write_part

    rows = _rows((0.1, 0.6))
    out = str(tmp_path / "scores")
    write_part(to_table({c: rows[c].tolist() for c in rows.columns}), out, "2026-01-01", "v")
    html_path = tmp_path / "r.html"
    summary = build_report(ReportConfig(scores=out, out=str(html_path)))
    assert summary.n_patients == 1
    html = html_path.read_text()
    assert "not been validated against lesion masks on real films" in html
    assert html.count('alt="COVID-19 map (model scale)"') == 2
    assert "COVID area 0.10" in html and "COVID area 0.60" in html
    assert "not comparable between studies" not in html  # every study has the fixed map

    # The timeline plots the fixed-scale area: same per-image areas, different pictures.
    series = rows.assign(t=rows["study_day"])
    other = series.assign(cam_covid_area=[0.6, 0.1])
    assert timeline_png(series, False) != timeline_png(other, False)
    # Without the model's scale, the page says the plotted area is not comparable.
    old = _rows(None)
    out_old = str(tmp_path / "old")
    write_part(to_table({c: old[c].tolist() for c in old.columns}), out_old, "2026-01-01", "v")
    build_report(ReportConfig(scores=out_old, out=str(tmp_path / "old.html")))
    assert "not comparable between studies" in (tmp_path / "old.html").read_text()
