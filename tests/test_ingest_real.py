"""Ingest of the real chest X-rays in ../shared/data/cxr, to a local folder and to S3, plus the
same images mixed with odd and corrupt files, plus synthetic phantoms."""

from __future__ import annotations

import hashlib
import io
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidray import storage
from covidray.cli import main
from covidray.codec import unit_to_u8
from covidray.config import IngestConfig
from covidray.decode import decode_array
from covidray.ingest import ingest
from covidray.manifest import read_manifest
from covidray.preprocess import resize_shorter_side
from covidray.synth import write_phantoms

EXPECTED = {"covid": 154, "pneumonia": 273, "normal": 283}


def _check_real_manifest(df: pd.DataFrame, shared: Path) -> None:
    assert len(df) == 710
    assert df["label"].value_counts().to_dict() == EXPECTED
    # no patient in two splits
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    # stratified by label and age group: every split holds adults and children of each class
    # that has them
    for (label, age_group), group in df.groupby(["label", "age_group"]):
        assert set(group["split"]) == {"train", "val", "test"}, (label, age_group)
    fractions = df["split"].value_counts(normalize=True)
    assert abs(fractions["train"] - 0.70) < 0.03 and abs(fractions["test"] - 0.15) < 0.03
    assert set(df["source"]) == {"ieee8023", "figure1", "actualmed", "kaggle", "nih"}
    assert (df["source"] == df["patient_id"].str.split(":").str[0]).all()
    assert not df["synthetic"].any()
    # metadata carried over, unknown columns kept
    assert {"license_note", "source_sha1", "source_path"} <= set(df.columns)
    series = df.dropna(subset=["study_day"]).groupby("patient_id")["study_day"].nunique()
    assert (series >= 2).sum() == 21
    # image_id is the sha256 of the raw input bytes
    for row in df.sample(5, random_state=0).itertuples():
        assert row.image_id == hashlib.sha256(Path(row.source_uri).read_bytes()).hexdigest()


@pytest.mark.usefixtures("ray_cluster")
def test_ingest_real_local_and_s3_agree(
    shared_cxr: Path, tmp_path: Path, s3_server, capsys
) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="cxr")
    local = str(tmp_path / "dev")
    assert main(["ingest", str(shared_cxr), local]) == 0
    assert main(["ingest", str(shared_cxr), "s3://cxr/dev"]) == 0
    out = capsys.readouterr()
    assert "710 images ingested" in out.err
    df_local = read_manifest(local).to_pandas()
    df_s3 = read_manifest("s3://cxr/dev").to_pandas()
    _check_real_manifest(df_local, shared_cxr)
    _check_real_manifest(df_s3, shared_cxr)
    cols = ["image_id", "uri", "label", "patient_id", "split", "width", "height"]
    pd.testing.assert_frame_equal(df_local[cols], df_s3[cols])
    # the stored images are there, 8-bit grayscale with shorter side 256
    for uri in df_s3["uri"].sample(5, random_state=1):
        img = Image.open(io.BytesIO(storage.read_bytes(storage.join("s3://cxr/dev", uri))))
        assert img.mode == "L" and min(img.size) == 256
    assert storage.read_parquet("s3://cxr/dev/errors.parquet").num_rows == 0


@pytest.mark.usefixtures("ray_cluster")
def test_ingest_real_images_with_odd_files_from_s3(
    shared_cxr: Path, tmp_path: Path, s3_bucket: str
) -> None:
    """Class folders on S3 holding real images plus >= 20 odd or corrupt files."""
    manifest = pd.read_csv(shared_cxr / "manifest.csv")
    picked = manifest.groupby("label").head(25)
    src = f"{s3_bucket}/incoming"
    for row in picked.itertuples():
        storage.write_bytes(
            f"{src}/{row.label}/{Path(row.image).name}", (shared_cxr / row.image).read_bytes()
        )
    from oddfiles import make_odd_files

    from covidray.sidecars import is_sidecar

    odd = [f for f in make_odd_files(seed=0) if not is_sidecar(f.name)]  # sidecars: skipped
    assert sum(not f.good for f in odd) >= 20
    for i, f in enumerate(odd):
        storage.write_bytes(f"{src}/{('covid', 'pneumonia', 'normal')[i % 3]}/{f.name}", f.data)

    dest = str(tmp_path / "out")
    cfg = IngestConfig(src=src, dest=dest, parallel_threshold=16, chunk_size=8)
    result = ingest(cfg)
    df = read_manifest(dest).to_pandas()
    errors = storage.read_parquet(storage.join(dest, "errors.parquet")).to_pandas()
    by_name = {Path(u).name: r for u, r in zip(df["source_uri"], df.itertuples(), strict=True)}
    err_by_name = dict(
        zip(errors["source_uri"].map(lambda u: Path(u).name), errors["reason"], strict=True)
    )

    # every good file is ingested; every bad one is an error row with its reason
    for row in picked.itertuples():
        assert Path(row.image).name in by_name
    for f in odd:
        if f.good:
            assert f.name in by_name, (f.name, err_by_name.get(f.name))
        else:
            assert err_by_name.get(f.name) == f.reason, f.name
    assert result.n_rows == len(picked) + sum(f.good for f in odd)
    assert not errors["detail"].isna().any()

    # 16-bit, RGBA, CMYK and DICOM inputs are decoded by the convention, not rejected
    for f in odd:
        if not f.good or f.reference is None:
            continue
        row = by_name[f.name]
        stored = np.asarray(Image.open(storage.join(dest, row.uri)))
        expected = unit_to_u8(resize_shorter_side(f.reference.astype(np.float32), 256))
        assert stored.shape == expected.shape, f.name
        assert np.abs(stored.astype(int) - expected.astype(int)).max() <= 1, f.name


def test_synth_phantoms_ingest_with_aligned_masks(tmp_path: Path) -> None:
    src = str(tmp_path / "phantoms")
    write_phantoms(src, n_per_class=4, seed=3)
    dest = str(tmp_path / "out")
    result = ingest(IngestConfig(src=src, dest=dest))
    df = read_manifest(dest).to_pandas()
    assert result.n_rows == 12 and Counter(df["label"]) == {"covid": 4, "pneumonia": 4, "normal": 4}
    assert set(df["source"]) == {"phantom"}
    assert not df["synthetic"].any()
    # masks were carried along, never ingested as X-rays
    assert not df["source_uri"].str.contains("mask").any()
    original = pd.read_csv(Path(src) / "manifest.csv")
    for row in df.itertuples():
        rel = Path(row.source_uri).relative_to(src).as_posix()
        entry = original.set_index("image").loc[rel]
        if row.label == "normal":
            assert not np.asarray(Image.open(storage.join(dest, row.mask_uri))).any()
            continue
        stored_mask = np.asarray(Image.open(storage.join(dest, row.mask_uri))) > 127
        source_mask = decode_array((Path(src) / entry["mask"]).read_bytes()) > 0.5
        stored_img = np.asarray(Image.open(storage.join(dest, row.uri)))
        assert stored_mask.shape == stored_img.shape
        np.testing.assert_array_equal(stored_mask, source_mask)


def test_ingest_dest_on_s3_from_phantoms_on_s3(s3_bucket: str, tmp_path: Path) -> None:
    src = f"{s3_bucket}/phantoms"
    write_phantoms(src, n_per_class=2, seed=1)
    assert main(["synth", str(tmp_path / "unused"), "--n-per-class", "1"]) == 0
    dest = f"{s3_bucket}/dataset"
    result = ingest(IngestConfig(src=src, dest=dest))
    assert result.n_rows == 6
    df = read_manifest(dest).to_pandas()
    for row in df.itertuples():
        assert storage.exists(storage.join(dest, row.uri))
        assert storage.exists(storage.join(dest, row.mask_uri))
    shutil.rmtree(tmp_path / "unused")
