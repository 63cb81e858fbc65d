"""The rescoring job (Ray Data) on moto S3: incremental runs, new model versions, overlays, odd
and corrupt inputs, and a driver killed with SIGKILL half-way, then rerun to completion.

Tiny data: 64-px phantoms or generated PNGs, EfficientNet-Lite0 with random weights at 64 px.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from covidray import storage
from covidray.codec import decode_png_u8
from covidray.config import IngestConfig
from covidray.ingest import ingest
from covidray.labels import CLASSES
from covidray.manifest import read_manifest
from covidray.pseudonyms import pseudonymize, shift_date
from covidray.score import ScoreConfig, read_predictions, run_score
from covidray.score.results import fresh_listing, list_files
from covidray.sidecars import is_sidecar
from covidray.synth import write_phantoms

sys.path.insert(0, str(Path(__file__).resolve().parent))

from oddfiles import DICOM_PATIENT_ID, DICOM_PATIENT_NAME, make_odd_files  # noqa: E402
from tinymodels import png_bytes, save_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


def put_files(prefix: str, files: dict[str, bytes]) -> None:
    fs, path = storage.filesystem(prefix)
    fs.pipe({f"{path}/{name}": data for name, data in files.items()})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cfg(**kw) -> ScoreConfig:
    base = {"batch_size": 8, "rows_per_file": 16, "read_chunk": 8, "workers": 1, "threads": 1}
    return ScoreConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def dataset_s3(s3_server, tmp_path_factory) -> str:
    """Phantoms ingested into a dataset on S3 (bucket made here: module scope)."""
    import boto3

    bucket = "score-dataset"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    raw = str(tmp_path_factory.mktemp("phantoms"))
    write_phantoms(raw, n_per_class=6, seed=0, size=64)
    dest = f"s3://{bucket}/dataset"
    ingest(IngestConfig(src=raw, dest=dest, size=64))
    return dest


# ------------------------------------------------------------------------------- config


def test_config_from_yaml_and_flags(tmp_path: Path, monkeypatch) -> None:
    from covidray.cli import build_parser
    from covidray.cli.flags import config_from_args

    monkeypatch.setenv("COVIDRAY_PSEUDONYM_KEY", "s3cr3t-42")
    path = tmp_path / "score.yaml"
    path.write_text("model: s3://m/model\nbatch_size: 64\noverlays: true\n")
    args = build_parser().parse_args(["score", "--data", "d", "--out", "o", "--workers", "3"])
    args.config = str(path)
    c = config_from_args(ScoreConfig, args)
    assert (c.model, c.data, c.workers, c.batch_size, c.overlays) == (
        "s3://m/model",
        "d",
        3,
        64,
        True,
    )
    assert c.pseudonym_key is not None and c.pseudonym_key.get_secret_value() == "s3cr3t-42"
    assert "s3cr3t" not in repr(c) and "s3cr3t" not in c.model_dump_json()
    with pytest.raises(ValueError, match="extra"):
        ScoreConfig(model="m", data="d", out="o", batchsize=3)
    from covidray.report.config import ReportConfig

    report = build_parser().parse_args(["report", "--scores", "s", "--out", "r.html"])
    r = config_from_args(ReportConfig, report)
    assert (r.scores, r.out, r.data) == ("s", "r.html", None)


# ------------------------------------------------------------------------------- incremental


def test_actor_plan_defaults() -> None:
    from covidray.score.job import plan_actors

    base = ScoreConfig(model="m", data="d", out="o")
    cpu = {"CPU": 4.0}
    # CPU: one actor with a thread per core; or as asked.
    p = plan_actors(base, cpu, {"CPU": 2.0}, cores=2)
    assert (p.device, p.workers, p.threads, p.resources) == ("cpu", 1, 2, {"num_cpus": 1.0})
    assert p.read_tasks == 1
    p = plan_actors(base.model_copy(update={"workers": 4}), cpu, cpu, cores=8)
    assert (p.workers, p.threads) == (4, 2)
    half = base.model_copy(update={"workers": 3, "cpus_per_worker": 0.5, "threads": 3})
    p = plan_actors(half, cpu, cpu, 4)
    assert (p.workers, p.threads, p.resources) == (3, 3, {"num_cpus": 0.5})
    # GPUs: one actor per free GPU (at least one), unless the CPU is asked for.
    gpu = {"CPU": 16.0, "GPU": 2.0}
    p = plan_actors(base, gpu, gpu, cores=16)
    assert (p.device, p.workers, p.threads, p.resources) == ("cuda", 2, 8, {"num_gpus": 1.0})
    assert p.read_tasks == 8
    assert plan_actors(base, gpu, {"CPU": 16.0}, cores=16).workers == 1  # all GPUs busy
    p = plan_actors(base.model_copy(update={"device": "cpu"}), gpu, gpu, cores=16)
    assert (p.device, p.workers, p.threads) == ("cpu", 1, 16)


@pytest.mark.usefixtures("ray_cluster")
def test_incremental_runs_and_new_model_version(dataset_s3: str, s3_bucket: str) -> None:
    manifest = read_manifest(dataset_s3).to_pandas().set_index("image_id")
    n = len(manifest)
    v1 = save_tiny_model(f"{s3_bucket}/models/v1", seed=0)
    v2 = save_tiny_model(f"{s3_bucket}/models/v2", seed=1)
    assert v1 != v2
    out = f"{s3_bucket}/scores"

    r1 = run_score(cfg(model=f"{s3_bucket}/models/v1", data=dataset_s3, out=out))
    assert (r1.n_inputs, r1.n_scored, r1.n_skipped, r1.n_errors) == (n, n, 0, 0)
    assert r1.input_kind == "manifest" and r1.model_version == v1 and r1.n_files >= 2
    t = read_predictions(out).to_pandas()
    assert len(t) == n and t["image_id"].is_unique and set(t["image_id"]) == set(manifest.index)
    assert (t["model_version"] == v1).all() and t["error"].isna().all()
    probs = t[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert (t["label"] == [CLASSES[i] for i in probs.argmax(axis=1)]).all()
    for col in ("cam_area", "cam_peak_y", "cam_peak_x", "cam_border_energy"):
        assert t[col].between(0, 1).all(), col
    assert all(decode_png_u8(b).shape == (2, 2) for b in t["cam_png"])
    assert (t["run_date"] == r1.run_date).all()
    # Where the time went: every stage timed; the actor's busy share of the scoring time.
    assert set(r1.stage_s) == {"list", "fetch", "decode", "model", "encode", "write"}
    assert min(r1.stage_s.values()) >= 0 and r1.stage_s["model"] > 0
    assert r1.stage_s["model"] + r1.stage_s["encode"] <= r1.elapsed_s + 0.05
    assert r1.actor_busy is not None and 0 < r1.actor_busy <= 1.01
    # Manifest metadata carried over; uri is where the (stored) image is.
    m = manifest.loc[t["image_id"]]
    assert (t["patient_id"].to_numpy() == m["patient_id"].to_numpy()).all()
    np.testing.assert_array_equal(t["study_day"].isna(), m["study_day"].isna())
    assert storage.exists(t["uri"].iloc[0]) and t["uri"].iloc[0].startswith(dataset_s3)

    # Same model again: nothing to do, nothing written.
    files = list_files(out)
    r2 = run_score(cfg(model=f"{s3_bucket}/models/v1", data=dataset_s3, out=out))
    assert (r2.n_scored, r2.n_skipped, r2.n_errors, r2.n_files) == (0, n, 0, 0)
    assert list_files(out) == files

    # A new model version rescores everything (with overlays this time).
    r3 = run_score(
        cfg(model=f"{s3_bucket}/models/v2", data=dataset_s3, out=out, overlays=True, workers=2)
    )
    assert (r3.n_scored, r3.n_skipped, r3.model_version) == (n, 0, v2)
    both = read_predictions(out).to_pandas()
    assert len(both) == 2 * n
    assert both.groupby("model_version")["image_id"].nunique().to_dict() == {v1: n, v2: n}
    assert not both.duplicated(["image_id", "model_version"]).any()
    for image_id in list(manifest.index)[:3]:
        overlay = Image.open(io.BytesIO(storage.read_bytes(f"{out}/overlays/{image_id}.png")))
        assert overlay.mode == "RGB" and overlay.size == (SIZE, SIZE)
    fresh_listing(f"{out}/overlays")
    assert len(storage.walk_files(f"{out}/overlays")) == n


# ------------------------------------------------------------------------------- bad inputs


@pytest.mark.usefixtures("ray_cluster")
def test_odd_and_corrupt_files_become_error_rows(s3_bucket: str) -> None:
    odd = [f for f in make_odd_files(seed=0) if not is_sidecar(f.name)]  # sidecars: not listed
    bad = [f for f in odd if not f.good]
    assert len(bad) >= 20
    files = {f"odd/{f.name}": f.data for f in odd}
    files.update({f"good/img{i:02d}.png": png_bytes(i) for i in range(12)})
    files["good/scan [1] *copy?.png"] = png_bytes(99)  # glob characters are just characters
    ids = {name: sha(data) for name, data in files.items()}
    assert len(set(ids.values())) == len(files)  # all distinct: one row each
    put_files(f"{s3_bucket}/in", files)
    sidecars = {"odd/notes.txt": b"no row", "good/.DS_Store": b"Bud1", "odd/a.json": b"{}"}
    put_files(f"{s3_bucket}/in", sidecars)  # listed by no run: n_inputs counts `files` only
    save_tiny_model(f"{s3_bucket}/model", seed=0)
    key = "site-secret"
    out = f"{s3_bucket}/out"

    # keep_source_paths: rows are found by file name here (without: tests/test_privacy.py).
    run = cfg(
        model=f"{s3_bucket}/model",
        data=f"{s3_bucket}/in",
        out=out,
        pseudonym_key=key,
        keep_source_paths=True,
    )
    r = run_score(run)
    n_good = len(files) - len(bad)
    assert r.input_kind == "prefix" and r.n_inputs == len(files)
    assert (r.n_scored, r.n_errors) == (n_good, len(bad))
    t = read_predictions(out).to_pandas()
    assert len(t) == len(files) and t["image_id"].is_unique
    by_uri = t.set_index("uri")
    for name in files:
        row = by_uri.loc[f"{s3_bucket}/in/{name}"]
        assert row["image_id"] == ids[name], name
    for f in odd:
        row = by_uri.loc[f"{s3_bucket}/in/odd/{f.name}"]
        if f.good:
            assert pd.isna(row["error"]) and row["label"] in CLASSES, f
        else:
            assert row["error"] == f.reason and row["error_detail"], f
            assert pd.isna(row["label"]) and pd.isna(row["cam_png"]) and pd.isna(row["prob_covid"])
    good = t[t["error"].isna()]
    assert len(good) == n_good and good["cam_png"].notna().all()
    # DICOM patients only as keyed pseudonyms; the raw ID and name appear nowhere.
    dicom_rows = t[t["uri"].str.endswith(".dcm") & t["error"].isna()]
    assert len(dicom_rows) >= 5
    assert (
        dicom_rows["patient_id"] == f"dicom:{pseudonymize(DICOM_PATIENT_ID, key.encode())}"
    ).all()
    patient = f"dicom:{pseudonymize(DICOM_PATIENT_ID, key.encode())}"
    assert (dicom_rows["study_date"] == shift_date("2020-03-15", patient, key.encode())).all()
    for uri in list_files(out):
        blob = storage.read_bytes(uri)
        assert DICOM_PATIENT_ID.encode() not in blob and DICOM_PATIENT_NAME.encode() not in blob

    # Rerun: known-bad files are done too (their error rows carry this model version).
    again = run_score(run)
    assert (again.n_scored, again.n_errors, again.n_skipped) == (0, 0, len(files))


# ------------------------------------------------------------------------------- driver kill


def _rows(out: str) -> int:
    """Rows in the complete prediction files under ``out`` (each file is read in full)."""
    total = 0
    for uri in list_files(out):
        with storage.filesystem(uri)[0].open(storage.filesystem(uri)[1], "rb") as f:
            total += pq.read_metadata(f).num_rows
    return total


def _wait_cluster_idle(ray, timeout: float = 180.0) -> None:
    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= total:
            return
        time.sleep(0.5)
    raise AssertionError(
        f"resources of the killed driver were not released: {ray.available_resources()}"
    )


def _driver(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """``python jobs/rescore.py ARGV``: stdout to ``log``.out, stderr to ``log``.err."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "rescore.py"), *argv],
        cwd=REPO,
        env=env,
        stdout=log.with_suffix(".out").open("wb"),
        stderr=log.with_suffix(".err").open("wb"),
        start_new_session=True,
    )


def _tail(log: Path) -> str:
    return log.with_suffix(".err").read_text(errors="replace")[-3000:]


def test_driver_sigkill_then_rerun_has_one_row_per_image(
    ray_cluster, s3_bucket: str, tmp_path: Path
) -> None:
    n = 320
    files = {f"batch/{i // 100:02d}/img{i:04d}.png": png_bytes(1000 + i) for i in range(n)}
    put_files(f"{s3_bucket}/in", files)
    save_tiny_model(f"{s3_bucket}/model", seed=2)
    out = f"{s3_bucket}/out"
    # Small read chunks and files keep the run fine-grained enough to stop it halfway. The
    # killed driver leaves its lock on the output: the rerun waits for it to go stale.
    config = tmp_path / "score.yaml"
    config.write_text("read_chunk: 8\nlock_stale_after_s: 10\nlock_wait_s: 120\n")
    argv = [
        "--model", f"{s3_bucket}/model", "--data", f"{s3_bucket}/in", "--out", out,
        "--batch-size", "4", "--rows-per-file", "8", "--workers", "1", "--threads", "1",
        "--config", str(config),
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    log1 = tmp_path / "run1"
    proc = _driver(argv, log1, env)
    try:
        # Each file holds up to 8 rows; listing is cheaper than reading them. Kill at ~half.
        deadline = time.monotonic() + 480  # generous: the CPU may be shared
        while len(list_files(out)) * 8 < n // 2:
            assert proc.poll() is None, f"driver ended before the kill:\n{_tail(log1)}"
            assert time.monotonic() < deadline, f"no progress:\n{_tail(log1)}"
            time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    _wait_cluster_idle(ray_cluster)
    time.sleep(1.0)  # nothing of the dead job may still be writing
    partial = _rows(out)
    assert 0 < partial < n, partial
    partial_table = read_predictions(out)
    assert len(set(partial_table.column("image_id").to_pylist())) == partial

    log2 = tmp_path / "run2"
    rerun = _driver(argv, log2, env)
    try:
        assert rerun.wait(timeout=480) == 0, _tail(log2)
    finally:
        if rerun.poll() is None:
            rerun.kill()
    result = json.loads(log2.with_suffix(".out").read_text().strip().splitlines()[-1])
    assert result["n_skipped"] == partial and result["n_scored"] == n - partial
    t = read_predictions(out).to_pandas()
    assert len(t) == n and t["image_id"].is_unique
    assert set(t["image_id"]) == {sha(d) for d in files.values()}
    assert t["error"].isna().all()
    _wait_cluster_idle(ray_cluster)
