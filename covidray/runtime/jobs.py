"""covidray commands as Ray jobs: submission through Ray's Jobs API, logs, status, stop.

A submission runs ``covidray COMMAND ARGS`` on the cluster (the driver on the head node) in a
runtime environment that carries the project: this checkout as the ``working_dir`` (less
virtual environments, outputs, caches and data), or nothing when the cluster's image has the
package installed. Storage settings travel by name and value (S3 endpoint and region);
credentials never do, neither in the runtime env nor in the entrypoint: Ray's dashboard and
state API show both to anyone who can reach the cluster. The job's processes find credentials
as any process on their node does (the pod's identity or a mounted Secret).

The Jobs API runs arbitrary code, so clusters run Ray's token authentication
(``RAY_AUTH_MODE=token``). The token is read from ``RAY_AUTH_TOKEN`` or from the file named
by ``RAY_AUTH_TOKEN_PATH`` and sent as ``Authorization: Bearer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .. import storage
from .config import ADDRESS_ENV, JobsConfig, SubmitConfig

SUBMITTABLE = ("train", "gan", "score", "evaluate", "ingest", "publish", "nightly")
TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # Ray's clients prefer it to the address they get
# Gitignore-style patterns, relative to the checkout, that never travel with the job.
EXCLUDES = (
    ".git",
    ".venv",
    "venv",
    "/demo-output",
    "/data",
    "__pycache__",
    "*.py[cod]",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "*.egg-info",
    "/build",
    "/dist",
)
# The storage settings a job gets from the submitting shell: where, never who.
S3_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
SECRET_NAMES = ("SECRET", "PASSWORD", "TOKEN", "_KEY", "CREDENTIAL")
METADATA_KEY = "covidray_command"
STOPPED_EXIT = 130  # the job was stopped from here (Ctrl-C), as a shell reports SIGINT


class ClusterRefused(ValueError):
    """The cluster refused the request (token missing or wrong) or could not be reached."""


class Submission(BaseModel):
    """What :func:`submit` sends: one shell command and its runtime environment."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]


class JobOutcome(BaseModel):
    """How a followed job ended."""

    job_id: str
    status: str
    exit_code: int  # the driver's, or 1 for a failure without one, STOPPED_EXIT when stopped
    message: str = ""
    wall_s: float = 0.0


# ----------------------------------------------------------------------------- the submission


def find_checkout() -> Path | None:
    """The source checkout this ``covidray`` package runs from (None: an installed package)."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "covidray"' in pyproject.read_text():
        return root
    return None


def working_dir(choice: str) -> Path | None:
    """``SubmitConfig.working_dir`` resolved: a checkout to upload, or None (installed)."""
    if choice == "installed":
        return None
    if choice == "auto":
        return find_checkout()
    path = Path(choice).expanduser().resolve()
    if not (path / "covidray" / "__init__.py").is_file():
        raise ValueError("--working-dir must be a covidray checkout, 'installed' or 'auto'")
    return path


def _secret_like(name: str) -> bool:
    upper = name.upper()
    return upper not in storage.AWS_SETTINGS and any(s in upper for s in SECRET_NAMES)


def load_runtime_env(uri: str | None) -> dict[str, Any]:
    """The ``--runtime-env`` file (YAML or JSON, local or on object storage), checked."""
    if not uri:
        return {}
    extra = yaml.safe_load(storage.read_text(uri)) or {}
    if not isinstance(extra, dict):
        raise ValueError("--runtime-env must hold a mapping of runtime env fields")
    secrets = sorted(k for k in (extra.get("env_vars") or {}) if _secret_like(str(k)))
    if secrets:
        raise ValueError(
            f"--runtime-env sets {', '.join(secrets)}: credentials never go into a job's "
            "runtime env (Ray shows it to anyone who can reach the cluster); the cluster's pods "
            "get them from their identity or a mounted Secret"
        )
    return extra


def runtime_env(cfg: SubmitConfig, checkout: Path | None) -> dict[str, Any]:
    """The job's runtime env: the checkout (if any), S3 settings by value, the file's fields."""
    extra = load_runtime_env(cfg.runtime_env)
    env: dict[str, Any] = {}
    if checkout is not None:
        env["working_dir"] = str(checkout)
        env["excludes"] = [*EXCLUDES, *extra.pop("excludes", [])]
    env_vars = {}
    if cfg.s3_settings:
        env_vars = {k: v for k, v in storage.aws_settings().items() if k in S3_SETTINGS}
    env_vars.update({str(k): str(v) for k, v in (extra.pop("env_vars", None) or {}).items()})
    env.update(extra)
    if env_vars:
        env["env_vars"] = env_vars
    return env


def entrypoint(command: str, args: Sequence[str], checkout: Path | None) -> str:
    """The job's shell command: the uploaded checkout's CLI, or the image's ``covidray``."""
    if command not in SUBMITTABLE:
        raise ValueError(f"cannot submit {command!r}; one of {', '.join(SUBMITTABLE)}")
    program = ["python", "-m", "covidray.cli"] if checkout is not None else ["covidray"]
    return shlex.join([*program, command, *args])


def build_submission(cfg: SubmitConfig, command: str, args: Sequence[str]) -> Submission:
    """The job for ``covidray COMMAND ARGS`` (nothing is sent)."""
    checkout = working_dir(cfg.working_dir)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Submission(
        submission_id=f"covidray-{command}-{stamp}-{uuid.uuid4().hex[:6]}",
        entrypoint=entrypoint(command, args, checkout),
        runtime_env=runtime_env(cfg, checkout),
        metadata={METADATA_KEY: command},
    )


# ------------------------------------------------------------------------------ the cluster


def auth_token() -> str | None:
    """Ray's token from ``RAY_AUTH_TOKEN`` or the file ``RAY_AUTH_TOKEN_PATH`` (None: none)."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    path = os.environ.get(TOKEN_PATH_ENV)
    if not path:
        return None
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as err:
        raise ClusterRefused(f"{TOKEN_PATH_ENV} names no readable file") from err
    if not token:
        raise ClusterRefused(f"the file named by {TOKEN_PATH_ENV} is empty")
    return token


@contextlib.contextmanager
def _cluster_errors(address: str) -> Iterator[None]:
    """Ray's authentication and connection errors as one-line :class:`ClusterRefused`."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as err:
        if "required" in str(err).splitlines()[0].lower():
            raise ClusterRefused(
                f"the Ray cluster at {address} requires a token: set {TOKEN_ENV} or "
                f"{TOKEN_PATH_ENV}"
            ) from None
        raise ClusterRefused(f"the Ray cluster at {address} refused the token") from None
    except ConnectionError as err:
        raise ClusterRefused(f"cannot reach the Ray Jobs API at {address}") from err
    except RuntimeError as err:
        if "status code 404" in str(err):
            raise ClusterRefused("no such job on the cluster") from None
        raise


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    """These environment variables unset for the duration of the block."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class Jobs:
    """A cluster's Jobs API, authenticated with :func:`auth_token` when there is one."""

    def __init__(self, cfg: JobsConfig) -> None:
        from ray.job_submission import JobSubmissionClient

        if not cfg.address:
            raise ValueError(
                "no Ray cluster: give --address (its Jobs API, e.g. http://head:8265) or set "
                "RAY_ADDRESS"
            )
        self.address = cfg.address
        token = auth_token()
        # An explicit header: Ray's client adds its own only when this process runs in token
        # mode, which a laptop submitting to a cluster need not.
        headers = {"Authorization": f"Bearer {token}"} if token else None
        # Ray's client prefers RAY_API_SERVER_ADDRESS and RAY_ADDRESS to the address it is
        # given: the given address decides here, whatever this shell's environment says.
        with _cluster_errors(self.address), _without_env(API_SERVER_ENV, ADDRESS_ENV):
            self.client = JobSubmissionClient(self.address, headers=headers)

    def submit(self, job: Submission) -> str:
        with _cluster_errors(self.address):
            return self.client.submit_job(
                entrypoint=job.entrypoint,
                runtime_env=job.runtime_env,
                submission_id=job.submission_id,
                metadata=job.metadata,
            )

    def list(self) -> list[Any]:
        """Every job of the cluster (Ray's ``JobDetails``), oldest first."""
        with _cluster_errors(self.address):
            jobs = self.client.list_jobs()
        return sorted(jobs, key=lambda j: j.start_time or 0)

    def info(self, job_id: str) -> Any:
        with _cluster_errors(self.address):
            return self.client.get_job_info(job_id)

    def logs(self, job_id: str) -> str:
        with _cluster_errors(self.address):
            return self.client.get_job_logs(job_id)

    def stop(self, job_id: str, timeout_s: float = 60.0) -> str:
        """Stop the job and wait until it is over; its final status."""
        with _cluster_errors(self.address):
            self.client.stop_job(job_id)
            deadline = time.monotonic() + timeout_s
            while not (status := self.client.get_job_status(job_id)).is_terminal():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        return str(status.value)

    def follow(
        self,
        job_id: str,
        on_text: Callable[[str], None],
        on_status: Callable[[str, float], None] | None = None,
        poll_s: float = 1.0,
    ) -> JobOutcome:
        """Stream the job's logs to ``on_text`` and status changes to ``on_status(status,
        seconds since the start)`` until it ends; Ctrl-C stops the job. Its outcome."""
        t0 = time.monotonic()
        try:
            with _cluster_errors(self.address):
                asyncio.run(self._follow(job_id, on_text, on_status, poll_s, t0))
        except KeyboardInterrupt:
            if on_status is not None:
                on_status("STOPPING", time.monotonic() - t0)
            self.stop(job_id)
            return self.outcome(job_id, t0, stopped_here=True)
        return self.outcome(job_id, t0)

    def outcome(self, job_id: str, t0: float, *, stopped_here: bool = False) -> JobOutcome:
        info = self.info(job_id)
        status = str(info.status.value)
        code = info.driver_exit_code
        if status == "SUCCEEDED":
            exit_code = code or 0
        elif status == "STOPPED":
            exit_code = STOPPED_EXIT if stopped_here else 1
        else:
            exit_code = code if code else 1
        return JobOutcome(
            job_id=job_id,
            status=status,
            exit_code=exit_code,
            message=info.message or "",
            wall_s=round(time.monotonic() - t0, 1),
        )

    async def _follow(
        self,
        job_id: str,
        on_text: Callable[[str], None],
        on_status: Callable[[str, float], None] | None,
        poll_s: float,
        t0: float,
    ) -> None:
        shown = 0

        async def tail() -> None:
            nonlocal shown
            async for chunk in self.client.tail_job_logs(job_id):
                on_text(chunk)
                shown += len(chunk)

        logs = asyncio.create_task(tail())
        last = None
        while True:
            status = await asyncio.to_thread(self.client.get_job_status, job_id)
            if status != last and on_status is not None:
                on_status(str(status.value), time.monotonic() - t0)
            last = status
            if status.is_terminal():
                break
            await asyncio.sleep(poll_s)
        try:  # the stream ends with the job; give it a moment to deliver the last lines
            await asyncio.wait_for(logs, timeout=15)
        except Exception:  # cut off or too slow: fetch what it did not deliver
            logs.cancel()
            rest = await asyncio.to_thread(self.client.get_job_logs, job_id)
            on_text(rest[shown:])


def job_row(job: Any) -> dict[str, str]:
    """A job's line in ``covidray jobs list``: id, status, command, times; never the
    entrypoint's arguments (they name data locations)."""

    def when(ms: int | None) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else ""

    duration = ""
    if job.start_time:
        end = job.end_time or time.time() * 1000
        duration = f"{(end - job.start_time) / 1000:.0f} s"
    metadata: Mapping[str, str] = job.metadata or {}
    return {
        "id": job.submission_id or job.job_id or "",
        "status": str(job.status.value),
        "command": metadata.get(METADATA_KEY, "-"),
        "started (UTC)": when(job.start_time),
        "duration": duration,
        "exit": "" if job.driver_exit_code is None else str(job.driver_exit_code),
    }


def describe(job: Submission) -> str:
    """One line about a submission without its arguments (which name data locations)."""
    code = "this checkout" if "working_dir" in job.runtime_env else "the cluster's image"
    env = json.dumps(sorted(job.runtime_env.get("env_vars", {})))
    return f"{job.submission_id}: covidray {job.metadata[METADATA_KEY]} from {code}, env {env}"
