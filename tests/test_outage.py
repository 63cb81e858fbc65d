"""Issue 13, item 2: outages longer than the retry budget of s3fs and botocore (3-14 s,
docs/faults.md).

The one-minute outage: a nightly run (``jobs/rescore.py`` in a driver process of its own, on the
session's Ray, every S3 request of the driver and of its Ray workers through the fault proxy of
``tests/faultproxy.py``) loses its storage for 60 s from its first image GET. The images read
during the outage get ``retry`` rows (never permanent errors), the prediction files wait the
outage out instead of failing the run, and the next run scores exactly the retried images.
Around it: which errors count as transient, a write whose retry budget runs out fails loudly,
and a PUT to a server gone silent is bounded in time.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from covidray import storage
from covidray.manifest import to_table
from covidray.score import ScoreConfig, read_predictions, run_score
from covidray.score.results import scored_ids, write_part

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultproxy import FaultProxy  # noqa: E402
from tinymodels import png_bytes, save_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUTAGE_S = 60.0
N_IMAGES = 8


def write_dataset(ds: str, n: int) -> list[str]:
    """``n`` images and their manifest (as ingest writes it); returns the image ids."""
    rows = []
    for i in range(n):
        image_id = f"{i:064x}"
        storage.write_bytes(storage.join(ds, f"images/{image_id}.png"), png_bytes(i))
        rows.append(
            {
                "image_id": image_id,
                "uri": f"images/{image_id}.png",
                "label": "normal",
                "patient_id": f"p{i}",
                "source": "t",
                "split": "test",
                "synthetic": False,
                "width": 64,
                "height": 64,
            }
        )
    storage.write_parquet(to_table(rows), storage.join(ds, "manifest.parquet"))
    return [r["image_id"] for r in rows]


def test_transient_errors() -> None:
    from aiohttp import ClientPayloadError
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

    transient = [
        EndpointConnectionError(endpoint_url="u"),  # refused: an outage
        ConnectionClosedError(endpoint_url="u"),  # reset mid-answer
        ClientPayloadError("cut"),  # a body cut short
        OSError(errno.EBUSY, "Service Unavailable"),  # s3fs's 503 SlowDown
        OSError(errno.EIO, "InternalError"),
        TimeoutError(),
        ConnectionResetError(errno.ECONNRESET, "reset"),
    ]
    permanent = [
        PermissionError("AccessDenied"),
        FileNotFoundError("NoSuchBucket"),
        OSError(errno.EINVAL, "InvalidRequest"),
        ValueError("a bug"),
        storage.StorageUnavailable("budget spent"),
    ]
    assert all(storage.is_transient(e) for e in transient)
    assert not any(storage.is_transient(e) for e in permanent)


@pytest.fixture
def proxy(s3_server, monkeypatch):
    """A fault proxy in front of moto; this process's S3 traffic goes through it."""
    with FaultProxy(s3_server) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


def test_write_past_its_budget_fails_loudly_and_leaves_nothing(s3_bucket, proxy) -> None:
    from datetime import UTC, datetime

    from scorefiles import to_table as prediction_rows

    from covidray.score.results import list_files

    rows = prediction_rows(
        {"image_id": ["a"], "uri": ["u"], "model_version": ["v"], "scored_at": [datetime.now(UTC)]}
    )
    out = f"{s3_bucket}/out"
    proxy.set_fault("outage")
    t0 = time.monotonic()
    with pytest.raises(storage.StorageUnavailable, match="still failing"):
        write_part(rows, out, "2026-01-01", "v", retry_s=2)
    assert time.monotonic() - t0 < 40
    proxy.clear()
    assert list_files(out) == []  # nothing half-written: the rerun redoes the batch
    uri = write_part(rows, out, "2026-01-01", "v", retry_s=2)
    assert list_files(out) == [uri]


def test_a_silent_server_does_not_hold_a_put(s3_bucket, proxy, monkeypatch) -> None:
    """The S3 client waits for ``100 Continue`` with no timeout (docs/faults.md): a bounded
    attempt, then a retry, instead of a hang."""
    monkeypatch.setattr(storage, "PUT_TIMEOUT_S", 2.0)
    proxy.set_fault("stall", methods=["PUT"], delay=60, duration=1)
    t0 = time.monotonic()
    storage.write_bytes(f"{s3_bucket}/k", b"data", retry_s=30)
    assert time.monotonic() - t0 < 20
    proxy.clear()
    assert storage.read_bytes(f"{s3_bucket}/k") == b"data"


# --------------------------------------------------------------------- the one-minute outage


def test_one_minute_outage_during_a_nightly_run(
    ray_cluster, s3_server, s3_bucket: str, tmp_path: Path
) -> None:
    ds, model, out = f"{s3_bucket}/ds", f"{s3_bucket}/model", f"{s3_bucket}/scores"
    ids = write_dataset(ds, N_IMAGES)
    save_tiny_model(model, seed=3)
    config = tmp_path / "score.yaml"
    config.write_text("read_chunk: 4\n")
    argv = [
        "--model", model, "--data", ds, "--out", out, "--batch-size", "4",
        "--rows-per-file", "4", "--workers", "1", "--threads", "1", "--config", str(config),
    ]  # fmt: skip
    images = "/" + ds.split("://", 1)[1] + "/images/"
    with FaultProxy(s3_server) as proxy:
        fired: dict[str, float] = {}

        def at_first_image_get(method: str, path: str) -> None:
            if not fired and method == "GET" and path.startswith(images):
                fired["t"] = time.monotonic()
                proxy.set_fault("outage", duration=OUTAGE_S)

        proxy.on_request = at_first_image_get
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": proxy.url,  # the driver's, and its Ray job's workers'
            "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
        }
        log = tmp_path / "driver"
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "rescore.py"), *argv],
            cwd=tmp_path,  # not the checkout: Ray workers import covidray as the driver does
            env=env,
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),
            timeout=360,
        )
        wall = time.monotonic() - t0
    tail = log.read_text(errors="replace")[-3000:]
    assert fired, f"no image GET went through the proxy:\n{tail}"
    assert proc.returncode == 0, f"the run failed on the outage:\n{tail}"
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert time.monotonic() - fired["t"] >= OUTAGE_S - 1  # it ran until after the outage
    rows = read_predictions(out).to_pandas()
    assert sorted(rows["image_id"]) == sorted(ids)  # one row per image, none lost
    assert set(rows["status"]) <= {"scored", "retry"}, rows["status"].value_counts()
    retry = rows[rows["status"] == "retry"]
    assert len(retry) >= 1 and set(retry["error"]) == {"unreadable"}
    assert result["n_retry"] == len(retry) and result["n_errors"] == len(retry)
    assert wall < 300

    # The next night (no faults): exactly the retried images are read and scored.
    version = rows["scoring_version"].iloc[0]
    done_before = scored_ids(out, version)
    cfg = ScoreConfig(
        model=model, data=ds, out=out, batch_size=4, rows_per_file=4, read_chunk=4,
        workers=1, threads=1,
    )  # fmt: skip
    again = run_score(cfg)
    assert again.n_skipped == len(done_before) == N_IMAGES - len(retry)
    assert again.n_scored == len(retry) and again.n_errors == 0
    assert scored_ids(out, version) == set(ids)
