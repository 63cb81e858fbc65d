"""``covidray submit`` and ``covidray jobs`` against a real ``ray start --head`` on 127.0.0.1:
once with token authentication disabled, once with ``RAY_AUTH_MODE=token`` (a missing or wrong
token refused). Data on the session's moto S3 server; the head gets the server's endpoint and
test credentials in its own environment, as a pod does, never through the job."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from raynodes import RayNode, node_env, ray_head

from covidray import storage
from covidray.cli import main
from covidray.runtime.config import JobsConfig, SubmitConfig
from covidray.runtime.jobs import Jobs, build_submission
from covidray.score.lock import OutputLock

REPO = Path(__file__).resolve().parents[1]
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def _aws_env() -> dict[str, str]:
    """The moto server's endpoint, region and test credentials (from the s3_server fixture)."""
    keys = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", *CREDENTIALS)
    return {k: os.environ[k] for k in keys}


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    import boto3

    name = f"submit-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def phantoms(bucket: str) -> str:
    """4 phantoms per class at 64 px, in the manifest.csv layout, on S3."""
    from covidray.synth import write_phantoms

    write_phantoms(f"{bucket}/raw", 4, seed=0, size=64)
    return f"{bucket}/raw"


def _head(**env: str) -> Iterator[RayNode]:
    """A head node in a short temp dir of its own (Unix socket paths must stay short)."""
    tmp = Path(tempfile.mkdtemp(prefix="crs", dir="/tmp"))
    try:
        with ray_head(tmp, num_cpus=2, env=node_env(tmp, **_aws_env(), **env)) as head:
            yield head
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def head(s3_server) -> Iterator[RayNode]:
    """A head without token authentication."""
    yield from _head()


@pytest.fixture(scope="module")
def token_head(s3_server) -> Iterator[tuple[RayNode, str]]:
    """A head with Ray's token authentication on, and its token."""
    token = secrets.token_hex(16)
    for node in _head(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token):
        yield node, token


@pytest.fixture
def no_token(monkeypatch) -> None:
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)


def _submit(head: RayNode, command: str, *args: str, options: tuple[str, ...] = ()) -> int:
    return main(["submit", command, "--address", head.dashboard_url, *options, "--", *args])


def _jobs(head: RayNode) -> Jobs:
    return Jobs(JobsConfig(address=head.dashboard_url))


def _err(capfd) -> str:
    """What the command printed on stderr, unwrapped (rich wraps at the console's width)."""
    return " ".join(capfd.readouterr().err.split())


def _wait_for(predicate, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


# --------------------------------------------------------------------------- no cluster needed


def test_the_job_carries_the_checkout_and_s3_settings_never_credentials(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-marker")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-marker")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "t0ken-marker")
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::1:role/laptop")  # this shell's identity
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-marker")
    args = ["--model", "s3://m/model", "--data", "s3://pacs/day one", "--out", "s3://scores"]
    job = build_submission(SubmitConfig(address="http://x"), "score", args)
    assert job.entrypoint == (
        "python -m covidray.cli score --model s3://m/model --data 's3://pacs/day one' "
        "--out s3://scores"
    )
    env = job.runtime_env
    assert Path(env["working_dir"]) == REPO
    assert {".venv", "/demo-output", "/data", "__pycache__"} <= set(env["excludes"])
    assert env["env_vars"] == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    assert "marker" not in job.model_dump_json()
    assert job.metadata == {"covidray_command": "score"}

    installed = build_submission(SubmitConfig(working_dir="installed"), "gan", ["train"])
    assert installed.entrypoint == "covidray gan train"
    assert "working_dir" not in installed.runtime_env
    bare = build_submission(SubmitConfig(s3_settings=False, working_dir="installed"), "ingest", [])
    assert bare.runtime_env == {}


def test_a_runtime_env_file_with_credentials_is_refused(tmp_path: Path, capfd) -> None:
    path = tmp_path / "env.yaml"
    path.write_text("env_vars:\n  AWS_SECRET_ACCESS_KEY: s3cr3t-marker\n  OMP_NUM_THREADS: '2'\n")
    args = ("--model", "s3://m", "--data", "s3://d", "--out", "s3://o")
    rc = main(
        ["submit", "score", "--address", "http://127.0.0.1:9", "--runtime-env", str(path)]
        + ["--", *args]
    )
    err = _err(capfd)
    assert rc == 2 and "AWS_SECRET_ACCESS_KEY" in err and "marker" not in err
    path.write_text("env_vars:\n  OMP_NUM_THREADS: '2'\nexcludes: [bench]\n")
    env = build_submission(SubmitConfig(runtime_env=str(path)), "score", list(args)).runtime_env
    assert env["env_vars"]["OMP_NUM_THREADS"] == "2" and "bench" in env["excludes"]


# ------------------------------------------------------------------- head without token auth


def test_the_given_address_beats_the_environments(head: RayNode, monkeypatch) -> None:
    """Ray's client prefers RAY_API_SERVER_ADDRESS and RAY_ADDRESS to the address it is given:
    ``--address`` decides here, and the shell's variables are left as they were."""
    elsewhere = "http://127.0.0.1:9"  # nothing listens (discard)
    monkeypatch.setenv("RAY_ADDRESS", elsewhere)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", elsewhere)
    jobs = _jobs(head)
    assert jobs.client.get_address() == head.dashboard_url
    assert isinstance(jobs.list(), list)
    assert os.environ["RAY_ADDRESS"] == os.environ["RAY_API_SERVER_ADDRESS"] == elsewhere


def test_a_typo_fails_before_anything_is_submitted(head: RayNode, capfd) -> None:
    before = len(_jobs(head).list())
    assert _submit(head, "score", "--modle", "s3://m", "--data", "s3://d", "--out", "s3://o") == 2
    assert "nothing submitted" in _err(capfd)
    assert _submit(head, "train", "--data", "s3://d", "--out", "s3://o", "--epochs", "0") == 2
    assert len(_jobs(head).list()) == before


def test_submit_runs_the_job_follows_its_logs_and_returns_its_status(
    head: RayNode, phantoms: str, bucket: str, capfd
) -> None:
    dataset = f"{bucket}/ds"
    assert _submit(head, "ingest", phantoms, dataset, "--size", "64") == 0
    out, err = capfd.readouterr()
    err = " ".join(err.split())
    lines = [line for line in out.splitlines() if line.startswith('{"layout"')]
    summary = json.loads(lines[-1])  # the job's own JSON line, followed
    assert summary["n_rows"] == 12 and summary["manifest_uri"] == f"{dataset}/manifest.parquet"
    assert storage.exists(f"{dataset}/manifest.parquet")
    assert "job RUNNING" in err and "SUCCEEDED" in err
    # The checkout travelled without the virtual environment, git and caches.
    found = head.temp_dir.glob("session_latest/runtime_resources/working_dir_files/*")
    unpacked = [p for p in found if p.is_dir()]
    assert unpacked, "no working_dir on the node"
    for folder in unpacked:
        assert (folder / "covidray" / "__init__.py").is_file()
        assert not {".venv", ".git", "demo-output"} & {p.name for p in folder.iterdir()}
    job = [j for j in _jobs(head).list() if (j.metadata or {}).get("covidray_command")][-1]
    assert "marker" not in json.dumps(job.runtime_env or {})
    assert not {*CREDENTIALS, "AWS_SESSION_TOKEN"} & set(
        (job.runtime_env or {}).get("env_vars", {})
    )


def test_a_failing_job_returns_non_zero(head: RayNode, bucket: str) -> None:
    rc = _submit(
        head, "score", "--model", f"{bucket}/no-model", "--data", f"{bucket}/ds",
        "--out", f"{bucket}/failing",
    )  # fmt: skip
    assert rc == 2  # the driver's exit status: a one-line error (no model there)
    last = _jobs(head).list()[-1]
    assert str(last.status.value) == "FAILED" and last.driver_exit_code == 2


def test_a_second_scoring_run_on_a_locked_output_exits_with_a_clear_message(
    head: RayNode, bucket: str, capfd
) -> None:
    out = f"{bucket}/locked"
    with OutputLock(out) as first:
        capfd.readouterr()
        rc = _submit(
            head, "score", "--model", f"{bucket}/model", "--data", f"{bucket}/ds", "--out", out
        )
        logs = capfd.readouterr().out
        assert rc == 2
        assert "another covidray score run is writing to this output" in logs
        assert first.run_id[:8] in logs and first.held


def test_no_wait_then_jobs_list_logs_and_stop(head: RayNode, bucket: str, capfd) -> None:
    out = f"{bucket}/waiting"
    with OutputLock(out):  # the job waits for this lock: a long-running job that costs nothing
        capfd.readouterr()
        args = ("--model", f"{bucket}/model", "--data", f"{bucket}/ds", "--out", out)
        assert _submit(head, "score", *args, "--lock-wait-s", "600", options=("--no-wait",)) == 0
        job_id = capfd.readouterr().out.strip().splitlines()[-1]
        assert job_id.startswith("covidray-score-")
        jobs = _jobs(head)
        _wait_for(lambda: "waiting up to" in jobs.logs(job_id), "the job to wait for the lock")

        assert main(["jobs", "list", "--address", head.dashboard_url]) == 0
        assert f"{job_id}\tRUNNING\tscore" in capfd.readouterr().out.splitlines()
        assert main(["jobs", "logs", job_id, "--address", head.dashboard_url]) == 0
        assert "waiting up to 600 s" in capfd.readouterr().out
        assert main(["jobs", "stop", job_id, "--address", head.dashboard_url]) == 0
        assert "STOPPED" in _err(capfd)
        assert str(jobs.info(job_id).status.value) == "STOPPED"


def test_ctrl_c_stops_the_job(head: RayNode, bucket: str, tmp_path: Path) -> None:
    out = f"{bucket}/interrupted"
    err = tmp_path / "submit.err"
    with OutputLock(out), err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "covidray.cli", "submit", "score"]
            + ["--address", head.dashboard_url, "--"]
            + ["--model", f"{bucket}/model", "--data", f"{bucket}/ds", "--out", out]
            + ["--lock-wait-s", "600"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=REPO,
        )
        try:
            _wait_for(lambda: "job RUNNING" in err.read_text(), "the job to run")
            job_id = err.read_text().split("submitted ", 1)[1].split(":", 1)[0]
            jobs = _jobs(head)
            _wait_for(lambda: "waiting up to" in jobs.logs(job_id), "the job to wait")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=120) == 130, err.read_text()[-2000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert str(jobs.info(job_id).status.value) == "STOPPED"
    assert "STOPPED" in err.read_text()


# ---------------------------------------------------------------------- head with token auth


@pytest.mark.usefixtures("no_token")
def test_token_auth_refuses_a_missing_or_wrong_token(
    token_head: tuple[RayNode, str], capfd, monkeypatch
) -> None:
    node, _ = token_head
    assert main(["jobs", "list", "--address", node.dashboard_url]) == 2
    assert "requires a token" in _err(capfd)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong-" + secrets.token_hex(8))
    assert main(["jobs", "list", "--address", node.dashboard_url]) == 2
    assert "refused the token" in _err(capfd)
    args = ("--model", "s3://m", "--data", "s3://d", "--out", "s3://o")
    assert _submit(node, "score", *args) == 2
    err = _err(capfd)
    assert "refused the token" in err and "wrong-" not in err


@pytest.mark.usefixtures("no_token")
def test_token_auth_accepts_the_token_from_its_file(
    token_head: tuple[RayNode, str], phantoms: str, bucket: str, tmp_path: Path, monkeypatch
) -> None:
    node, token = token_head
    path = tmp_path / "ray-token"
    path.write_text(token + "\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    dataset = f"{bucket}/ds-token"
    # Ray tasks for the decoding (threshold 0): the job's driver joins the cluster with the
    # token of its node's environment, never one sent with the job.
    options = ("--size", "64", "--parallel-threshold", "0")
    assert _submit(node, "ingest", phantoms, dataset, *options) == 0
    assert storage.exists(f"{dataset}/manifest.parquet")
    job = _jobs(node).list()[-1]
    assert token not in json.dumps(job.runtime_env or {}) and token not in job.entrypoint
