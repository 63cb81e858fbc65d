"""Shared fixtures: one moto S3 server and one local Ray per test session, temp folders.

Everything runs on 127.0.0.1: the S3 server is moto's real HTTP server, Ray is a real local
cluster. Nothing here is mocked.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

# No traffic beyond loopback: no EC2 metadata lookups, no Ray usage reports.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Ray 2.60 turns token auth on after its first ray.init; set the mode for server and clients.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("RAY_ADDRESS", None)
# Every Ray a test starts (the session's, `ray start` nodes) lives on 127.0.0.1 only.
os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
# On a machine shared with other work, Serve's HTTP proxy can take longer than its 5-s readiness
# check to start; Serve then kills it three checks later and serve.start fails. Tests give it a
# minute (every Ray they start inherits this; the product keeps Serve's defaults).
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")

SHARED_CXR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cxr"

# `make test-fast` runs what needs no Ray cluster, no S3 server and no training. A test is slow
# when it uses one of these fixtures (directly or through another fixture) ...
SLOW_FIXTURES = frozenset({"ray_cluster", "s3_server", "s3_bucket"})
# ... or sits in a module that starts Ray, servers or training runs by itself.
SLOW_MODULES = frozenset(
    {
        "test_bad_inputs",  # ingest through Ray tasks
        "test_finetune",  # training runs
        "test_fixed_cam",  # the scoring job
        "test_gan",  # CycleGAN training on Ray Train
        "test_gate",  # a model fitted on the shared X-rays, the scoring job
        "test_localization",  # a CNN trained on phantoms
        "test_outage",  # a fault proxy in front of the S3 server
        "test_privacy",  # the scoring job on a local Ray
        "test_runtime",  # Ray
        "test_score_job",  # the scoring job
        "test_serving",  # Ray Serve
        "test_submit",  # `ray start --head` clusters
        "test_train",  # Ray Train runs
        "test_two_nodes",  # a two-node Ray cluster
    }
)


def _on_s3(item: pytest.Item) -> bool:
    """A case of a fixture parametrized over storages (``params=["local", "s3"]``) on S3: its
    fixture asks for the S3 server at run time, so ``fixturenames`` does not show it."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(isinstance(v, str) and v == "s3" for v in params.values())


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        uses = set(getattr(item, "fixturenames", ()))
        if SLOW_FIXTURES & uses or module in SLOW_MODULES or _on_s3(item):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (random port), with AWS_* settings pointing at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    patch = pytest.MonkeyPatch()
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        patch.setenv(key, value)
    yield endpoint
    patch.undo()
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket; returns ``s3://name``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    # No region in the client kwargs: moto rejects a LocationConstraint for us-east-1.
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray for the session. 4 logical CPUs on 2 cores, so 2 one-CPU Train workers
    that read through Ray Data still leave CPUs for the reads."""
    import ray

    from covidray.runtime.cluster import ensure_ray

    ensure_ray(num_cpus=4, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_cxr() -> Path:
    """The real chest X-rays shipped beside the project; tests needing them skip without."""
    if not (SHARED_CXR / "manifest.csv").exists():
        pytest.skip(f"real X-rays not present at {SHARED_CXR}")
    return SHARED_CXR
