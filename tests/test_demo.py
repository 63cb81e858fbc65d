"""``covidray demo`` end to end on phantoms (small and short): the model it trains has a fixed
COVID-19 map scale and, given ``--views``, the gate's view check, and its report draws
model-scale maps without the "not comparable" caveat."""

from __future__ import annotations

from pathlib import Path

import pytest
from viewfilms import write_view_set

from covidray.modeldir import read_card


@pytest.mark.usefixtures("ray_cluster")
def test_demo_report_shows_model_scale_maps(tmp_path: Path, capsys) -> None:
    from covidray.cli import main

    views = write_view_set(tmp_path / "views-raw")
    work = tmp_path / "demo"
    argv = ["demo", "--workdir", str(work), "--views", views]
    argv += ["--phantoms-per-class", "12", "--epochs", "1", "--input-size", "64"]
    assert main(argv) == 0
    capsys.readouterr()
    card = read_card(str(work / "train" / "model"))
    assert card.cam_covid_scale is not None and card.cam_covid_scale > 0
    assert card.view_check is not None and card.view_check.cv["laterals_refused"][1] == 6
    html = (work / "report.html").read_text()
    assert 'alt="COVID-19 map (model scale)"' in html
    assert "not comparable between studies" not in html
