"""With a pseudonym key, no identifier leaves the process unhashed.

A marker string is planted in every identifier field (patient ids of every layout, DICOM
PatientID and PatientName, a source's own extra column) and in every file and folder name;
after ingest, the nightly job (prefix input, overlays, a corrupt file) and the report, it
appears in no output: decoded Parquet values, HTML, overlay and image names, console and log
records, log files. Raw study dates are shifted per patient: intervals survive, dates do not.
"""

from __future__ import annotations

import csv
import io
import logging
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from oddfiles import dicom_bytes
from PIL import Image

from covidray.cli import main
from covidray.modeldir import ModelCard, save_model_dir
from covidray.models import build_model

MARKER = "ZQXMARKER"
KEY = "site-secret-7"
RAW_DATES = ("2020-03-01", "2020-03-08", "2020-04-01", "2020-03-21", "2019-11-05")
SIZE = 64


def png(seed: int, size: tuple[int, int] = (72, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    img = 0.5 * x + 0.3 * y + 0.2 * rng.random((size[1], size[0]))
    buf = io.BytesIO()
    Image.fromarray(np.uint8(img * 255), "L").save(buf, "PNG")
    return buf.getvalue()


def dicom(patient_id: str, name: str, study_date: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 4095, (64, 56), dtype=np.uint16)
    return dicom_bytes(
        pixels, bits_stored=12, PatientID=patient_id, PatientName=name, StudyDate=study_date
    )


def write(root: Path, files: dict[str, bytes | str]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)


def csv_text(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def manifest_source(root: Path, older_film: bool = False) -> Path:
    """A ``manifest.csv`` source: patient p1 with two dated studies (7 days apart), p2 whose
    mask is missing, a listed file that is missing, a corrupt file, a DICOM file, a source
    column of its own (``accession``); the marker in every id, file and folder name."""
    m = MARKER
    rows = [
        ("imgs/{m}_a.png", "covid", f"site:{m}-p1", "2020-03-01", ""),
        ("imgs/{m}_b.png", "covid", f"site:{m}-p1", "2020-03-08", ""),
        ("imgs/{m}_c.png", "normal", f"site:{m}-p2", "2020-04-01", f"masks/{m}_mask.png"),
        ("imgs/{m}_missing.png", "normal", f"site:{m}-p4", "", ""),
        ("imgs/{m}_broken.png", "pneumonia", f"site:{m}-p5", "", ""),
        ("scans/{m}-dir/{m}.dcm", "pneumonia", f"site:{m}-p3", "2020-03-21", ""),
    ]
    if older_film:  # arrives later, is older than the others
        rows.append(("imgs/{m}_old.png", "covid", f"site:{m}-p1", "2019-11-05", ""))
    records = [
        {
            "image": image.format(m=m),
            "label": label,
            "patient_id": pid,
            "study_date": when,
            "source": "site",
            "mask": mask,
            "accession": f"{m}-ACC{i}",
        }
        for i, (image, label, pid, when, mask) in enumerate(rows)
    ]
    files: dict[str, bytes | str] = {
        f"imgs/{m}_a.png": png(1),
        f"imgs/{m}_b.png": png(2),
        f"imgs/{m}_c.png": png(3),
        f"imgs/{m}_broken.png": png(4)[:60],
        f"scans/{m}-dir/{m}.dcm": dicom(f"{m}-MRN", f"{m}^Jane", "20200321", 5),
        "manifest.csv": csv_text(records),
    }
    if older_film:
        files[f"imgs/{m}_old.png"] = png(6)
    write(root, files)
    return root


def other_layouts(root: Path) -> dict[str, Path]:
    """The marker in the ids of the class-folder, ieee8023, Kaggle and DICOM layouts."""
    m = MARKER
    write(
        root / "folders" / "site",
        {f"covid/{m}-a1.png": png(11), f"normal/{m}-sub/{m}-b2.png": png(12)},
    )
    meta = [
        {
            "patientid": f"{m}77",
            "offset": "0",
            "sex": "M",
            "age": "60",
            "finding": "COVID-19",
            "view": "PA",
            "modality": "X-ray",
            "date": "2020-03-21",
            "folder": "images",
            "filename": f"{m}_ieee.png",
        }
    ]
    write(root / "ieee", {"metadata.csv": csv_text(meta), f"images/{m}_ieee.png": png(13)})
    write(
        root / "kaggle",
        {
            f"chest_xray/train/PNEUMONIA/person{m}_virus_1.jpeg": png(14),
            f"chest_xray/train/NORMAL/{m}-IM-0001.jpeg": png(15),
        },
    )
    write(root / "pacs", {f"{m}/{m}.dcm": dicom(f"{m}-MRN2", f"{m}^Joe", "20200402", 16)})
    return {
        "class-folders": root / "folders" / "site",
        "ieee8023": root / "ieee",
        "kaggle": root / "kaggle",
        "dicom": root / "pacs",
    }


def tiny_model(uri: str) -> str:
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", weights=None)
    save_model_dir(model, ModelCard.for_model(model, SIZE, SIZE), uri)
    return uri


def parquet_text(folder: Path) -> str:
    """Every decoded value of every Parquet file under ``folder`` (bytes as latin-1)."""
    out = []
    for path in sorted(folder.rglob("*.parquet")):
        table = pq.read_table(path)
        out.append(" ".join(table.schema.names))
        for row in table.to_pylist():
            for value in row.values():
                out.append(value.decode("latin-1") if isinstance(value, bytes) else str(value))
    return "\n".join(out)


def names(folder: Path) -> str:
    return "\n".join(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.usefixtures("ray_cluster")
def test_marker_appears_in_no_output(tmp_path: Path, monkeypatch, caplog, capsys) -> None:
    monkeypatch.setenv("COVIDRAY_PSEUDONYM_KEY", KEY)
    monkeypatch.setenv("COVIDRAY_LOG_DIR", str(tmp_path / "logs"))
    caplog.set_level(logging.INFO)  # the most the command line ever logs (-v)
    src = manifest_source(tmp_path / "src")
    ds, out, html = tmp_path / "ds", tmp_path / "scores", tmp_path / "report.html"
    assert main(["ingest", str(src), str(ds), "--size", "64", "-v"]) == 0
    datasets = [ds]
    for name, folder in other_layouts(tmp_path / "more").items():
        dest = tmp_path / f"ds-{name}"
        assert main(["ingest", str(folder), str(dest), "--layout", name, "--size", "64"]) == 0
        datasets.append(dest)
    model = tiny_model(str(tmp_path / "model"))
    common = ["--batch-size", "8", "--workers", "1", "--threads", "1", "--read-chunk", "8"]
    # The nightly job on the raw source folder (a prefix: file names are all it knows).
    score = ["score", "--model", model, "--data", str(src), "--out", str(out), "--overlays"]
    assert main([*score, *common]) == 0
    assert main(["report", "--scores", str(out), "--out", str(html), "--data", str(ds)]) == 0

    outputs = {
        "parquet": "\n".join(parquet_text(d) for d in [*datasets, out]),
        "names": "\n".join(names(d) for d in [*datasets, out]),
        "html": html.read_text(encoding="utf-8"),
        "console": "".join(capsys.readouterr()),
        "records": caplog.text,
        "log files": "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*.log")),
    }
    for where, text in outputs.items():
        assert MARKER not in text, where
        for raw in RAW_DATES:
            assert raw not in text and raw.replace("-", "") not in text, (where, raw)
    assert (out / "overlays").is_dir() and any((out / "overlays").iterdir())
    assert "Patient psn:" in outputs["html"]  # the series of p1, under its pseudonym

    import pandas as pd

    manifest = pd.read_parquet(ds / "manifest.parquet")
    assert manifest["patient_id"].str.match(r"^(psn|dicom):[0-9a-f]{20}$").all()
    assert manifest["source_uri"].str.match(r"^ref:[0-9a-f]{20}$").all()
    assert "accession" not in manifest.columns  # the source's own columns may identify
    p1 = manifest.dropna(subset=["study_date"]).groupby("patient_id")["study_date"].apply(list)
    pair = next(v for v in p1 if len(v) == 2)
    days = sorted(date.fromisoformat(d) for d in pair)
    assert (days[1] - days[0]).days == 7  # the interval survives the shift
    errors = pd.read_parquet(ds / "errors.parquet")
    assert errors["source_uri"].str.match(r"^ref:[0-9a-f]{20}$").all()
    assert set(errors["reason"]) >= {"missing_file", "unreadable"}
    scores = pd.read_parquet(out / "predictions")
    assert scores["uri"].str.match(r"^image:[0-9a-f]{64}$").all()
    failed = scores[scores["error"].notna()]
    assert len(failed) == 1 and failed["error_detail"].str.fullmatch(r"\w+: \w+").all()


def test_dates_stay_put_when_an_older_film_arrives(tmp_path: Path, monkeypatch) -> None:
    import pandas as pd

    monkeypatch.setenv("COVIDRAY_PSEUDONYM_KEY", KEY)
    first, later = tmp_path / "first", tmp_path / "later"
    manifest_source(tmp_path / "src1")
    manifest_source(tmp_path / "src2", older_film=True)
    assert main(["ingest", str(tmp_path / "src1"), str(first), "--size", "64"]) == 0
    assert main(["ingest", str(tmp_path / "src2"), str(later), "--size", "64"]) == 0
    a = pd.read_parquet(first / "manifest.parquet").set_index("image_id")
    b = pd.read_parquet(later / "manifest.parquet").set_index("image_id")
    both = a.index.intersection(b.index)  # every file of the first source (same bytes)
    assert a.loc[both, "study_date"].notna().sum() == 3  # p1's two studies and the DICOM's
    assert (b.loc[both, "study_date"] == a.loc[both, "study_date"]).all()
    by_patient = b.dropna(subset=["study_date"]).groupby("patient_id")["study_date"].apply(set)
    assert any(len(dates) == 3 for dates in by_patient)  # p1 with the older film too
    for pid, dates in a.dropna(subset=["study_date"]).groupby("patient_id")["study_date"]:
        assert set(dates) <= by_patient[pid]  # the DICOM's patient too: same shift
    assert not set(a["study_date"].dropna()) & set(RAW_DATES)


def test_keep_source_paths_is_explicit(tmp_path: Path, monkeypatch) -> None:
    import pandas as pd

    monkeypatch.setenv("COVIDRAY_PSEUDONYM_KEY", KEY)
    src = manifest_source(tmp_path / "src")
    dest = tmp_path / "ds"
    assert main(["ingest", str(src), str(dest), "--size", "64", "--keep-source-paths"]) == 0
    manifest = pd.read_parquet(dest / "manifest.parquet")
    assert manifest["source_uri"].str.contains(MARKER).all()  # kept: a research set's choice
    assert not manifest["patient_id"].str.contains(MARKER).any()  # ids are keyed regardless


def test_dicomweb_pull_keeps_identifiers_in_the_link_table_only(tmp_path: Path, capsys) -> None:
    """A DICOMweb pull, error paths included (a malformed instance, a film beyond the size
    limit, Orthanc killed midway: retry rows, wrong credentials): the markers planted in
    PatientName, PatientID, AccessionNumber and every UID are in the link table only. (The
    scoring and publishing outputs are checked the same way in tests/test_pacs.py.)"""
    from orthanc import PASSWORD, USER, Orthanc, installed
    from pacs_studies import MARKER as PACS_MARKER
    from pacs_studies import UID_MARKER, Film, film_dataset, night_one

    if not installed():
        pytest.skip("Orthanc not installed: run scripts/install_orthanc.sh (make test)")
    orthanc = Orthanc(tmp_path / "orthanc").start()
    patch = pytest.MonkeyPatch()
    patch.setenv("COVIDRAY_DICOMWEB_USER", USER)
    patch.setenv("COVIDRAY_DICOMWEB_PASSWORD", PASSWORD)
    patch.setenv("COVIDRAY_PSEUDONYM_KEY", KEY)
    patch.setenv("COVIDRAY_LOG_DIR", str(tmp_path / "logs"))
    try:
        broken = film_dataset(Film(9, 1, "covid", "CR", seed=9))
        broken.PixelData = broken.PixelData[:100]  # cut short: decodes to an error row
        big = film_dataset(Film(8, 1, "normal", "DX", seed=8), size=160)
        orthanc.client().store_instances([film_dataset(f) for f in night_one()] + [broken, big])
        data, links = str(tmp_path / "data"), str(tmp_path / "links.parquet")
        argv = ["ingest", orthanc.url, data, "--links", links, "--size", "64",
                "--archive-requests", "1", "--decode-max-pixels", "20000"]  # fmt: skip
        orthanc.crash_on("GET", "/series/", nth=4)
        assert main(argv) == 0
        orthanc.restart()
        assert main(argv) == 0
        patch.setenv("COVIDRAY_DICOMWEB_PASSWORD", "wrong")
        assert main(argv) == 2
        out, err = capsys.readouterr()
    finally:
        orthanc.stop()
        patch.undo()
    errors = pq.read_table(tmp_path / "data" / "errors.parquet").to_pylist()
    assert {e["reason"] for e in errors} == {"truncated", "too_large"}
    texts = [out, err, *(str(p) for p in (tmp_path / "data").rglob("*"))]
    for path in (tmp_path / "data").rglob("*.parquet"):
        texts.append(str(pq.read_table(path).to_pylist()))
    texts += [p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log")]
    for marker in (PACS_MARKER, PACS_MARKER[:4], UID_MARKER):
        assert not any(marker in t for t in texts), marker
    assert UID_MARKER in str(pq.read_table(links).to_pylist())  # where they belong
