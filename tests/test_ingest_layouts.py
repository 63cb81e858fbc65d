"""Ingest of each source layout: class folders, manifest.csv, ieee8023, Kaggle, DICOM."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidray import storage
from covidray.cli import main
from covidray.config import IngestConfig
from covidray.ingest import ingest
from covidray.layouts import LayoutError, detect, ieee8023_finding, kaggle_patient
from covidray.manifest import read_manifest
from covidray.pseudonyms import shift_date


def _png(seed: int, size=(40, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size[::-1], dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(_png(seed))).save(buf, format="JPEG")
    return buf.getvalue()


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _rows(dest: str) -> list[dict]:
    return read_manifest(dest).to_pylist()


def _errors(dest: str) -> list[dict]:
    return storage.read_parquet(storage.join(dest, "errors.parquet")).to_pylist()


def test_class_folders_with_subtypes_and_duplicates(tmp_path: Path) -> None:
    _write(
        tmp_path / "src",
        {
            "COVID/a.png": _png(1),
            "covid/b.png": _png(2),
            "Viral Pneumonia/c.png": _png(3),
            "PNEUMONIA/person7_bacteria_1.jpeg": _jpeg(4),
            "PNEUMONIA/person7_virus_2.jpeg": _jpeg(5),
            "normal/d.png": _png(6),
            "normal/copy-of-d.png": _png(6),  # identical bytes: dropped and reported
            "README.pdf": b"%PDF-1.4 not a class folder",
        },
    )
    dest = str(tmp_path / "out")
    result = ingest(IngestConfig(src=str(tmp_path / "src"), dest=dest))
    assert result.layout == "class-folders"
    rows = {Path(r["source_uri"]).name: r for r in _rows(dest)}
    assert result.n_rows == len(rows) == 6
    assert result.n_duplicates == 1
    assert rows["c.png"]["label"] == "pneumonia" and rows["c.png"]["subtype"] == "viral"
    assert rows["person7_bacteria_1.jpeg"]["subtype"] == "bacterial"
    assert rows["person7_virus_2.jpeg"]["subtype"] == "viral"
    assert (
        rows["person7_bacteria_1.jpeg"]["patient_id"] == rows["person7_virus_2.jpeg"]["patient_id"]
    )
    reasons = {Path(e["source_uri"]).name: e["reason"] for e in _errors(dest)}
    assert reasons["README.pdf"] == "outside_class_folders"
    assert reasons[sorted(["d.png", "copy-of-d.png"])[1]] == "duplicate"
    # stored images: 8-bit grayscale PNG, shorter side 256, found under the manifest's folder
    for row in rows.values():
        img = Image.open(storage.join(dest, row["uri"]))
        assert img.mode == "L" and min(img.size) == 256 == min(row["width"], row["height"])


def test_sidecar_files_in_class_folders_are_skipped_not_errors(tmp_path: Path) -> None:
    """Notes, metadata and OS leftovers beside the images are no input and no error row; a
    file that claims to be an image but is not still is one."""
    _write(
        tmp_path / "src",
        {
            "covid/a.png": _png(1),
            "covid/a.json": b'{"annotator": "r1"}',
            "covid/notes.TXT": b"referring physician notes",
            "covid/.DS_Store": b"\x00\x00\x00\x01Bud1",
            "normal/b.png": _png(2),
            "normal/Thumbs.db": b"\xd0\xcf\x11\xe0",
            "normal/labels.csv": b"file,label\nb.png,normal\n",
            "normal/fake.png": b"<html>not found</html>",
            "README.md": b"# my dataset",
        },
    )
    dest = str(tmp_path / "out")
    result = ingest(IngestConfig(src=str(tmp_path / "src"), dest=dest))
    assert result.layout == "class-folders" and result.n_rows == 2
    assert {Path(r["source_uri"]).name for r in _rows(dest)} == {"a.png", "b.png"}
    reasons = {Path(e["source_uri"]).name: e["reason"] for e in _errors(dest)}
    assert reasons == {"fake.png": "not_an_image"}


def test_ieee8023_metadata_layout(tmp_path: Path) -> None:
    src = tmp_path / "covid-chestxray-dataset"
    entries = [
        # patientid, offset, sex, age, finding, view, modality, filename, expected
        ("1", "0", "M", "65", "COVID-19", "PA", "X-ray", "p1d0.png", ("covid", "covid19")),
        (
            "1",
            "7",
            "M",
            "65",
            "Pneumonia/Viral/COVID-19",
            "AP Supine",
            "X-ray",
            "p1d7.png",
            ("covid", "covid19"),
        ),
        (
            "2",
            "",
            "F",
            "40",
            "Pneumonia/Bacterial/Streptococcus",
            "AP",
            "X-ray",
            "p2.png",
            ("pneumonia", "bacterial"),
        ),
        ("3", "", "F", "12", "SARS", "PA", "X-ray", "p3.png", ("pneumonia", "viral")),
        ("4", "", "M", "50", "No Finding", "PA", "X-ray", "p4.png", ("normal", "normal")),
        ("5", "", "M", "50", "COVID-19", "L", "X-ray", "p5-lateral.png", "excluded_view"),
        ("6", "", "M", "50", "COVID-19", "Axial", "CT", "p6-ct.png", "excluded_modality"),
        ("7", "", "M", "50", "Tuberculosis", "PA", "X-ray", "p7.png", "excluded_finding"),
        ("8", "", "M", "50", "COVID-19", "PA", "X-ray", "p8-missing.png", "missing_file"),
    ]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "patientid",
            "offset",
            "sex",
            "age",
            "finding",
            "view",
            "modality",
            "folder",
            "filename",
            "date",
        ]
    )
    for i, (pid, offset, sex, age, finding, view, modality, name, _) in enumerate(entries):
        w.writerow(
            [pid, offset, sex, age, finding, view, modality, "images", name, "March 3, 2020"]
        )
        if "missing" not in name:
            _write(src, {f"images/{name}": _png(10 + i)})
    (src / "metadata.csv").write_text(buf.getvalue())
    dest = str(tmp_path / "out")
    assert main(["ingest", str(src), dest]) == 0
    rows = {Path(r["source_uri"]).name: r for r in _rows(dest)}
    errors = {Path(e["source_uri"]).name: e["reason"] for e in _errors(dest)}
    for *_, name, expected in entries:
        if isinstance(expected, tuple):
            assert (rows[name]["label"], rows[name]["subtype"]) == expected
            assert rows[name]["source"] == "ieee8023"
        else:
            assert errors[name] == expected
    assert rows["p1d7.png"]["study_day"] == 7 and rows["p1d7.png"]["patient_id"] == "ieee8023:1"
    assert rows["p3.png"]["age_group"] == "child" and rows["p2.png"]["age_group"] == "adult"
    assert rows["p1d0.png"]["split"] == rows["p1d7.png"]["split"]
    assert rows["p2.png"]["finding"] == "Pneumonia/Bacterial/Streptococcus"  # kept


def test_kaggle_layout(tmp_path: Path) -> None:
    src = tmp_path / "chest_xray"
    _write(
        src,
        {
            "train/NORMAL/IM-0115-0001.jpeg": _jpeg(1),
            "train/NORMAL/NORMAL2-IM-0847-0001.jpeg": _jpeg(2),
            "train/PNEUMONIA/person1_bacteria_1.jpeg": _jpeg(3),
            "test/PNEUMONIA/person1_virus_6.jpeg": _jpeg(4),
            "val/PNEUMONIA/person22_virus_55.jpeg": _jpeg(5),
            "__MACOSX/train/NORMAL/._IM-0115-0001.jpeg": b"\x00\x05\x16\x07",
        },
    )
    dest = str(tmp_path / "out")
    result = ingest(IngestConfig(src=str(src), dest=dest))
    assert result.layout == "kaggle"
    rows = {Path(r["source_uri"]).name: r for r in _rows(dest)}
    assert set(rows) == {
        "IM-0115-0001.jpeg",
        "NORMAL2-IM-0847-0001.jpeg",
        "person1_bacteria_1.jpeg",
        "person1_virus_6.jpeg",
        "person22_virus_55.jpeg",
    }
    assert rows["NORMAL2-IM-0847-0001.jpeg"]["patient_id"] == "kaggle:NORMAL2-IM-0847"
    assert rows["person1_virus_6.jpeg"]["subtype"] == "viral"
    assert rows["person1_bacteria_1.jpeg"]["subtype"] == "bacterial"
    assert rows["person1_virus_6.jpeg"]["source_split"] == "test"
    assert {r["age_group"] for r in rows.values()} == {"child"}
    assert {r["source"] for r in rows.values()} == {"kaggle"}
    assert kaggle_patient("person1_virus_6.jpeg") == "person1"


def _dicom_bytes(patient_id: str, seed: int, monochrome1: bool = False) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = "Doe^Jane"
    ds.PatientAge = "045Y"
    ds.PatientSex = "F"
    ds.ViewPosition = "PA"
    ds.StudyDate = "20200321"
    ds.Modality = "DX"
    pixels = np.random.default_rng(seed).integers(0, 4095, (48, 40), dtype=np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_dicom_folder_pseudonymizes_and_never_logs_ids(tmp_path: Path, caplog, capsys) -> None:
    src = tmp_path / "pacs-export"
    _write(
        src,
        {
            "a/1.dcm": _dicom_bytes("MRN-0042", 1),
            "a/2.dcm": _dicom_bytes("MRN-0042", 2, monochrome1=True),
            "b/3": _dicom_bytes("MRN-0077", 3),  # no extension, as PACS exports often are
            "b/notes.txt": b"referring physician notes",  # a sidecar: skipped
            "b/4.dcm": b"DICM but not really",
        },
    )
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\na/1.dcm,covid\nb/3,normal\n")
    dest = str(tmp_path / "out")
    caplog.set_level(logging.DEBUG)
    code = main(
        ["-v", "ingest", str(src), dest, "--labels", str(labels)],
    )
    assert code == 2  # no pseudonym key configured: refused, with a clear message
    assert "pseudonym" in capsys.readouterr().err.lower()

    key_env = {"COVIDRAY_PSEUDONYM_KEY": "site-secret"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in key_env.items():
            mp.setenv(k, v)
        # --keep-source-paths: this test finds rows by file name (tests/test_privacy.py: without)
        argv = ["-v", "ingest", str(src), dest, "--labels", str(labels), "--keep-source-paths"]
        assert main(argv) == 0
    rows = {Path(r["source_uri"]).name: r for r in _rows(dest)}
    assert set(rows) == {"1.dcm", "2.dcm", "3"}
    assert rows["1.dcm"]["patient_id"] == rows["2.dcm"]["patient_id"] != rows["3"]["patient_id"]
    assert rows["1.dcm"]["patient_id"].startswith("dicom:")
    assert rows["1.dcm"]["label"] == "covid" and rows["3"]["label"] == "normal"
    assert rows["2.dcm"]["label"] is None and rows["2.dcm"]["split"] is None  # unlabelled
    assert rows["1.dcm"]["view"] == "PA" and rows["1.dcm"]["age"] == 45
    # The study date moves back by the patient's keyed shift (tests/test_privacy.py).
    shifted = shift_date("2020-03-21", rows["1.dcm"]["patient_id"], b"site-secret")
    assert rows["1.dcm"]["study_date"] == shifted != "2020-03-21"
    assert rows["1.dcm"]["age_group"] == "adult"
    errors = {Path(e["source_uri"]).name: e["reason"] for e in _errors(dest)}
    assert errors == {"4.dcm": "not_an_image"}
    everything = (
        caplog.text
        + "".join(capsys.readouterr())
        + read_manifest(dest).to_pandas().to_csv()
        + str(_errors(dest))
    )
    for secret in ("MRN-0042", "MRN-0077", "Doe", "Jane"):
        assert secret not in everything


def test_detect_refuses_unknown_layout(tmp_path: Path) -> None:
    _write(tmp_path / "src", {"x/y.txt": b"hello"})
    with pytest.raises(LayoutError):
        detect(str(tmp_path / "src"), storage.walk_files(str(tmp_path / "src")))


def test_ieee8023_finding_map() -> None:
    assert ieee8023_finding("Pneumonia/Viral/Influenza") == ("pneumonia", "viral")
    assert ieee8023_finding("Pneumonia/Fungal/Pneumocystis") is None
    assert ieee8023_finding("Pneumonia") == ("pneumonia", "unknown")


def test_yaml_config_with_flag_override(tmp_path: Path) -> None:
    _write(tmp_path / "src", {"covid/a.png": _png(1), "normal/b.png": _png(2)})
    config = tmp_path / "ingest.yaml"
    config.write_text(f"src: {tmp_path / 'ignored'}\nsize: 64\nsplit:\n  seed: 3\n")
    dest = str(tmp_path / "out")
    assert main(["ingest", str(tmp_path / "src"), dest, "--config", str(config)]) == 0
    for row in _rows(dest):
        assert min(Image.open(storage.join(dest, row["uri"])).size) == 64
    bad = tmp_path / "bad.yaml"
    bad.write_text("sise: 64\n")  # a typo is an error, not silently ignored
    assert main(["ingest", str(tmp_path / "src"), dest, "--config", str(bad)]) == 2
