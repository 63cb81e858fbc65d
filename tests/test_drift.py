"""Drift, night by night: the validation split's answers stored with the calibration, each
nightly run's refusals by reason and class mix beside them (summary, run record, Ray metrics,
report)."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from oddfiles import dicom_bytes
from tinymodels import png_bytes, tiny_lite0

from covidray.drift import LABEL, REFUSED, OutputMix, compare


def test_shares_outside_the_runs_interval_are_flagged() -> None:
    ref = OutputMix(n=100, refused={"ood_image": 5}, labels={"covid": 30, "normal": 65})
    same = OutputMix.of(
        ["covid"] * 3 + ["normal"] * 6 + [None], [None] * 9 + ["ood_image"]
    )  # 10 % refused, a third COVID: within a 10-image night's noise
    assert not any(line.shifted for line in compare(same, ref))
    night = OutputMix(n=200, refused={"ood_image": 60, "modality:CT": 40}, labels={"covid": 100})
    lines = {(d.kind, d.key): d for d in compare(night, ref)}
    assert set(lines) == {
        (REFUSED, "ood_image"),
        (REFUSED, "modality:CT"),
        (LABEL, "covid"),
        (LABEL, "normal"),
    }
    ood = lines[(REFUSED, "ood_image")]
    assert (ood.count, ood.of, ood.share, ood.reference, ood.shifted) == (60, 200, 0.3, 0.05, True)
    assert lines[(REFUSED, "modality:CT")].reference == 0.0
    covid = lines[(LABEL, "covid")]  # classes are shares of the images in scope
    assert (covid.of, covid.share, covid.reference) == (100, 1.0, pytest.approx(30 / 95))
    assert lines[(LABEL, "normal")].share == 0.0 and lines[(LABEL, "normal")].shifted
    assert all(d.reference is None and not d.shifted for d in compare(night, None))


@pytest.mark.usefixtures("ray_cluster")
def test_reference_from_calibrate_and_drift_in_the_nightly_run(tmp_path: Path, capsys) -> None:
    """``covidray calibrate`` stores the validation split's answers in the card (scoring
    version unchanged by them); a nightly run of films and CT DICOMs reports its shares beside
    them in its summary, its run record, Ray's metrics and the report."""
    import ray

    from covidray.cli import main
    from covidray.config import IngestConfig, SplitConfig
    from covidray.dataset import load_rows
    from covidray.ingest import ingest
    from covidray.modeldir import ModelCard, read_card, save_model_dir
    from covidray.report import ReportConfig, build_report
    from covidray.score import ScoreConfig, run_score
    from covidray.score.results import read_run_records
    from covidray.synth import write_phantoms

    write_phantoms(str(tmp_path / "raw"), n_per_class=8, seed=5, size=64)
    ds = str(tmp_path / "ds")
    ingest(IngestConfig(src=str(tmp_path / "raw"), dest=ds, size=64, split=SplitConfig(seed=3)))
    model = str(tmp_path / "m")
    save_model_dir(tiny_lite0(5), ModelCard.for_model(tiny_lite0(5), 64, 64), model)
    assert main(["calibrate", "--model", model, "--data", ds]) == 0
    capsys.readouterr()
    card = read_card(model)
    ref = card.drift_reference
    n_val = int((load_rows(ds)["split"] == "val").sum())
    assert ref is not None and ref.split == "val" and ref.n == n_val
    assert sum(ref.refused.values()) + sum(ref.labels.values()) == n_val
    assert card.model_copy(update={"drift_reference": None}).scoring_version == (
        card.scoring_version
    )

    inputs = tmp_path / "night"
    inputs.mkdir()
    for i in range(4):
        (inputs / f"film{i}.png").write_bytes(png_bytes(i))
    ct = dicom_bytes(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), Modality="CT")
    for i in range(2):
        (inputs / f"ct{i}.dcm").write_bytes(ct[:-2] + bytes([i, 0]))  # two distinct images
    out = str(tmp_path / "out")
    result = run_score(ScoreConfig(model=model, data=str(inputs), out=out, threads=1))
    assert result.n_scored + result.n_out_of_scope == 6 and result.n_errors == 0
    assert result.gate_reasons["modality:CT"] == 2
    assert sum(result.labels.values()) == result.n_scored
    assert result.drift_reference == ref
    lines = {(d.kind, d.key): d for d in result.drift}
    ct_line = lines[(REFUSED, "modality:CT")]
    assert (ct_line.count, ct_line.of, ct_line.reference, ct_line.shifted) == (2, 6, 0.0, True)
    assert {k for kind, k in lines if kind == LABEL} == set(result.labels) | set(ref.labels)

    (record,) = read_run_records(out)
    assert record["drift"] == [d.model_dump(mode="json") for d in result.drift]
    assert record["drift_reference"]["n"] == n_val

    html_path = tmp_path / "report.html"
    build_report(ReportConfig(scores=out, out=str(html_path)))
    html = html_path.read_text()
    assert 'id="drift"' in html and "refused: modality:CT" in html
    assert "validation (val)" in html and "⚠" in html

    # The same shares on Ray's metrics endpoint (the driver's gauges).
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    wanted = ('kind="refused"', 'key="modality:CT"', 'source="run"')
    deadline = time.monotonic() + 120  # Ray exports on an interval
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        found = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("ray_covidray_nightly_share")
            and all(w in line for w in wanted)
            and result.scoring_version in line
        ]
        if found:
            break
        assert time.monotonic() < deadline, "covidray_nightly_share never exported"
        time.sleep(3)
    assert found == [pytest.approx(2 / 6)]
