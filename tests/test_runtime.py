"""The runtime module: the environment of the Ray processes the library starts, and jobs
submitted to a real ``ray start --head`` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest
from raynodes import ray_head

from covidray.runtime.cluster import JOB_CONFIG_ENV, MALLOC_TUNABLES, worker_runtime_env

SECRETS = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-marker", "AWS_SESSION_TOKEN": "t0ken-marker"}


def test_runtime_env_forwards_settings_not_secrets(monkeypatch) -> None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-marker")
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    env = worker_runtime_env({"X": "1"})["env_vars"]
    expected = {
        **MALLOC_TUNABLES,
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "X": "1",
    }
    assert expected.items() <= env.items()
    assert not {"AWS_ACCESS_KEY_ID", *SECRETS} & env.keys()
    assert "marker" not in json.dumps(env)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")  # the operator's choice wins
    assert "GLIBC_TUNABLES" not in worker_runtime_env()["env_vars"]


def test_runtime_env_leaves_the_jobs_own_variables_to_the_job(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv(
        JOB_CONFIG_ENV,
        json.dumps({"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}}}),
    )
    assert "AWS_ENDPOINT_URL" not in worker_runtime_env()["env_vars"]


@pytest.mark.usefixtures("ray_cluster")
def test_ray_workers_start_with_the_tunables() -> None:
    import ray

    @ray.remote(num_cpus=0)
    def tunables() -> str | None:
        return os.environ.get("GLIBC_TUNABLES")

    expected = os.environ.get("GLIBC_TUNABLES") or MALLOC_TUNABLES["GLIBC_TUNABLES"]
    assert ray.get(tunables.remote()) == expected


PROBE = """
import json, os, sys
import ray
from covidray.runtime.cluster import ensure_ray

os.environ.update(json.load(open(sys.argv[1])))  # credentials in the driver's environment
ensure_ray()

@ray.remote(num_cpus=0)
def probe():
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    return {"env": env, "runtime_env": dict(ray.get_runtime_context().runtime_env)}

print("PROBE " + json.dumps(ray.get(probe.remote())))
"""


def test_submitted_job_keeps_secrets_out_of_ray_and_merges_its_runtime_env() -> None:
    """A job submitted with its own runtime env (the same AWS settings covidray forwards) and
    credentials in its driver's environment: ``ensure_ray`` joins without Ray's "Failed to
    merge the Job's runtime env", and neither the workers nor Ray's job and state records see
    the secrets."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    head_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with tempfile.TemporaryDirectory(prefix="crt", dir="/tmp") as tmp:
        script = Path(tmp) / "probe.py"
        script.write_text(PROBE)
        secrets = Path(tmp) / "credentials.json"
        secrets.write_text(json.dumps(SECRETS))
        with ray_head(Path(tmp) / "ray", num_cpus=2, env=head_env) as head:
            client = JobSubmissionClient(head.dashboard_url)
            job = client.submit_job(
                entrypoint=f"{sys.executable} {script} {secrets}",
                runtime_env={
                    "env_vars": {
                        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                        "AWS_DEFAULT_REGION": "eu-west-1",
                    }
                },
            )
            deadline = time.monotonic() + 180
            while not client.get_job_status(job).is_terminal():
                assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
                time.sleep(1)
            logs = client.get_job_logs(job)
            assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
            probe = json.loads(logs.split("PROBE ", 1)[1].splitlines()[0])
            assert probe["env"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
            assert not SECRETS.keys() & probe["env"].keys()
            assert "marker" not in json.dumps(probe["runtime_env"])
            info = client.get_job_info(job)
            assert "marker" not in json.dumps(info.runtime_env or {})
            for kind in ("tasks", "actors", "jobs"):  # Ray's state API, as the dashboard shows
                assert "marker" not in _get(f"{head.dashboard_url}/api/v0/{kind}?limit=1000")


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()
