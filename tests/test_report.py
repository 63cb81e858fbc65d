"""The disease-progression report: one self-contained HTML file, checked with html.parser.

Predictions are made here with the Predictor and written with covidray.score.results (no Ray):
phantoms with progression series, and the real X-ray series of ../shared/data/cxr.
"""

from __future__ import annotations

import base64
import hashlib
import io
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scorefiles import to_table
from tinymodels import tiny_lite0

from covidray import storage
from covidray.cli import main
from covidray.codec import encode_png
from covidray.config import IngestConfig
from covidray.datapaths import resolve_inside
from covidray.decode import decode_image
from covidray.ingest import ingest
from covidray.labels import CLASSES
from covidray.manifest import manifest_base, read_manifest
from covidray.modeldir import ModelCard, save_model_dir
from covidray.predict import Predictor
from covidray.report import ReportConfig, build_report
from covidray.score.results import write_part
from covidray.synth import write_phantoms

SIZE = 64


class ReportParser(HTMLParser):
    """Collects patient sections, images (with their section) and every URL-like attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, dict[str, str | None]]] = []
        self.patients: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self.text: list[str] = []

    def _patient(self) -> str | None:
        for _, attrs in reversed(self.stack):
            if "patient" in (attrs.get("class") or "").split():
                return attrs.get("data-patient-id")
        return None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "srcset", "action")]
        if tag == "img":
            self.images.append({**a, "patient": self._patient()})
            return
        self.stack.append((tag, a))
        if tag == "section" and "patient" in (a.get("class") or "").split():
            self.patients.append(a["data-patient-id"] or "")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "img":
            return
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: str) -> ReportParser:
    p = ReportParser()
    p.feed(Path(path).read_text(encoding="utf-8"))
    p.close()
    return p


def check_self_contained(p: ReportParser) -> None:
    assert "script" not in p.tags and "link" not in p.tags and "iframe" not in p.tags
    assert p.urls and all(u.startswith("data:image/png;base64,") for u in p.urls), p.urls[:3]
    for img in p.images:
        data = base64.b64decode(img["src"].split(",", 1)[1], validate=True)
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(data)) as im:
            im.verify()


def tiny_model_dir(uri: str) -> str:
    model = tiny_lite0(0)
    save_model_dir(model, ModelCard.for_model(model, SIZE, SIZE), uri)
    return uri


def write_scores(rows: pd.DataFrame, model_dir: str, out: str) -> str:
    """Score ``rows`` (image_id, uri, patient_id, study_day, study_date) into ``out``."""
    p = Predictor.from_dir(model_dir, device="cpu", threads=1)
    res = p.predict([decode_image(storage.read_bytes(u)) for u in rows["uri"]])
    n = len(rows)
    cols = {c: rows[c].tolist() for c in ("image_id", "uri", "patient_id", "study_date")}
    cols["study_day"] = rows["study_day"].astype(float).to_numpy()
    for name in CLASSES:
        cols[f"prob_{name}"] = res.probs[:, p.classes.index(name)]
    cols.update(
        label=res.labels,
        model_version=[p.model_version] * n,
        cam_area=res.cam_area,
        cam_peak_y=res.cam_peak_y,
        cam_peak_x=res.cam_peak_x,
        cam_border_energy=res.cam_border_energy,
        cam_png=[encode_png(m) for m in res.cam_raw],
        scored_at=[datetime.now(UTC)] * n,
    )
    write_part(to_table(cols), out, "2026-01-01", p.model_version)
    return p.model_version


@pytest.fixture(scope="module")
def phantom_scores(tmp_path_factory) -> dict:
    """A phantom dataset, its predictions (one image flagged, one missing) and an error row."""
    root = tmp_path_factory.mktemp("report")
    write_phantoms(str(root / "raw"), n_per_class=6, seed=0, size=64)
    ds = str(root / "ds")
    ingest(IngestConfig(src=str(root / "raw"), dest=ds, size=64))
    manifest = read_manifest(ds).to_pandas()
    rows = manifest[["image_id", "uri", "patient_id", "study_day", "study_date"]].copy()
    rows["uri"] = [resolve_inside(manifest_base(ds), u) for u in rows["uri"]]
    model = tiny_model_dir(str(root / "model"))
    out = str(root / "scores")
    version = write_scores(rows, model, out)
    # Make one series image "flagged", and add an error row, through a second (later) file.
    series = manifest.dropna(subset=["study_day"]).groupby("patient_id")["study_day"].nunique()
    expected = sorted(series[series >= 2].index)
    assert len(expected) >= 2
    return {"ds": ds, "out": out, "version": version, "expected": expected, "rows": rows}


def test_phantom_report_sections_and_embedded_images(phantom_scores, tmp_path) -> None:
    html_path = str(tmp_path / "report.html")
    summary = build_report(
        ReportConfig(scores=phantom_scores["out"], out=html_path, data=phantom_scores["ds"])
    )
    assert summary.model_version == phantom_scores["version"]
    assert summary.n_patients == len(phantom_scores["expected"])
    assert summary.n_images == len(phantom_scores["rows"])
    p = parse(html_path)
    assert sorted(p.patients) == phantom_scores["expected"]
    check_self_contained(p)
    rows = phantom_scores["rows"]
    for pid in p.patients:
        mine = [i for i in p.images if i["patient"] == pid]
        assert sum(i.get("class") == "timeline" for i in mine) == 1
        thumbs = [i for i in mine if i.get("alt") == "Grad-CAM overlay"]
        assert len(thumbs) == (rows["patient_id"] == pid).sum()
    assert sum(i.get("class") == "histogram" for i in p.images) == 1
    text = " ".join(p.text)
    assert "Cohort summary" in text and "Errors (0)" in text
    # Nothing but pseudonymous ids: no file paths.
    assert "images/" not in Path(html_path).read_text() and str(tmp_path) not in text


def test_flags_errors_missing_images_and_cli(phantom_scores, tmp_path, capsys) -> None:
    out = str(tmp_path / "scores")
    rows = phantom_scores["rows"].copy()
    pid = phantom_scores["expected"][0]
    first = rows.index[rows["patient_id"] == pid][0]
    rows.loc[first, "uri"] = str(tmp_path / "gone.png")  # image no longer there
    ok = rows.drop(index=first)
    write_scores(ok, tiny_model_dir(str(tmp_path / "m")), out)
    from covidray.score import read_predictions

    table = read_predictions(out).to_pandas()
    version = table["model_version"].iloc[0]
    # One row: image moved away after scoring; one flagged; one error row.
    missing = table[table["patient_id"] == pid].iloc[0].to_dict()
    missing.update(uri=str(tmp_path / "gone.png"), image_id="f" * 64)
    flagged = table[table["patient_id"] == pid].iloc[-1].to_dict()
    flagged.update(image_id="e" * 64, cam_border_energy=0.9)
    error = {
        "image_id": "d" * 64,
        "uri": str(tmp_path / "broken.png"),
        "model_version": version,
        "error": "truncated",
        "error_detail": "PNG file ends inside its pixel data",
        "scored_at": datetime.now(UTC),
    }
    # One the input gate refused: it keeps its row, no label, counted by reason.
    lateral = table[table["patient_id"] == pid].iloc[-1].to_dict()
    lateral.update(
        image_id="c" * 64, label=None, in_scope=False, gate_reason="view:LL", status="out_of_scope"
    )
    extra = pd.DataFrame([missing, flagged, lateral])
    cols = {c: extra[c].tolist() for c in extra.columns}
    cols["study_day"] = extra["study_day"].astype(float).to_numpy()
    write_part(to_table(cols), out, "2026-01-02", version)
    write_part(to_table({k: [v] for k, v in error.items()}), out, "2026-01-02", version)

    html_path = str(tmp_path / "r.html")
    assert main(["report", "--scores", out, "--out", html_path]) == 0
    printed = capsys.readouterr().out
    assert '"n_flagged":1' in printed and '"n_out_of_scope":1' in printed
    p = parse(html_path)
    check_self_contained(p)
    text = " ".join(p.text)
    assert "Errors (1)" in text and "truncated" in text and "d" * 12 in text
    assert "Flagged: likely shortcut (1)" in text and "e" * 12 in text
    assert "image not available" in text
    assert "Out of scope (1)" in text and "view:LL" in text and "c" * 12 not in text
    assert pid in p.patients
    assert (
        sum(i.get("alt") == "Grad-CAM overlay" for i in p.images if i["patient"] == pid)
        == (table["patient_id"] == pid).sum() + 2
    )  # the moved and the flagged image; not the out-of-scope one


def test_no_series_gives_an_empty_but_valid_report(tmp_path) -> None:
    out = str(tmp_path / "scores")
    img = tmp_path / "a.png"
    Image.fromarray(np.full((40, 50), 128, np.uint8)).save(img)
    rows = pd.DataFrame(
        {
            "image_id": [hashlib.sha256(img.read_bytes()).hexdigest()],
            "uri": [str(img)],
            "patient_id": ["p1"],
            "study_day": [0.0],
            "study_date": [None],
        }
    )
    write_scores(rows, tiny_model_dir(str(tmp_path / "m")), out)
    summary = build_report(ReportConfig(scores=out, out=str(tmp_path / "r.html")))
    assert summary.n_patients == 0 and summary.n_images == 1
    p = parse(str(tmp_path / "r.html"))
    assert p.patients == [] and "No patient has two or more studies" in " ".join(p.text)
    check_self_contained(p)


def test_real_series_one_section_per_patient(shared_cxr: Path, tmp_path) -> None:
    m = pd.read_csv(shared_cxr / "manifest.csv")
    days = m.dropna(subset=["study_day"]).groupby("patient_id")["study_day"].nunique()
    series = sorted(days[days >= 2].index)
    assert len(series) == 21
    rows = m[m["patient_id"].isin(series)].copy()
    rows["uri"] = [str(shared_cxr / p) for p in rows["image"]]
    rows["image_id"] = [hashlib.sha256(Path(u).read_bytes()).hexdigest() for u in rows["uri"]]
    rows["study_date"] = None
    out = str(tmp_path / "scores")
    write_scores(rows.reset_index(drop=True), tiny_model_dir(str(tmp_path / "m")), out)
    html_path = str(tmp_path / "real.html")
    summary = build_report(ReportConfig(scores=out, out=html_path, max_thumbs=4))
    assert summary.n_patients == 21
    p = parse(html_path)
    assert sorted(p.patients) == series
    check_self_contained(p)
    for pid in series:
        thumbs = [i for i in p.images if i["patient"] == pid and i.get("alt") == "Grad-CAM overlay"]
        assert len(thumbs) == min(4, (rows["patient_id"] == pid).sum())
    assert Path(html_path).stat().st_size < 5_000_000
