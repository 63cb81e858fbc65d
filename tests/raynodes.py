"""Real Ray nodes for tests: ``ray start --head`` (and more nodes) on 127.0.0.1.

Each node runs ``ray start --block`` in a session of its own, with its own ``--temp-dir`` and
free ports, so it never meets the test session's Ray or another test's. ``stop()`` ends that
session's processes by their own ids (never ``ray stop``, which stops every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from covidray.runtime.cluster import free_port

RAY = str(Path(sys.executable).with_name("ray"))


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # session id; zombies are gone already
            pids.append(int(entry.name))
    return pids


class RayNode:
    """One Ray node started with ``ray start``; the head also serves the Jobs API."""

    def __init__(
        self,
        temp_dir: Path,
        *,
        head: RayNode | None = None,
        num_cpus: int = 2,
        resources: dict[str, float] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.temp_dir = Path(temp_dir)
        self.head = head
        self.num_cpus = num_cpus
        self.resources = resources or {}
        self.env = dict(os.environ if env is None else env)  # the node's whole environment
        self.gcs_port = head.gcs_port if head else free_port()
        self.dashboard_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout: float = 120) -> RayNode:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            RAY,
            "start",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.num_cpus}",
            f"--temp-dir={self.temp_dir}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
        ]
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        if self.head is None:
            cmd += [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
            ]
        else:
            cmd.append(f"--address={self.gcs_address}")
        log = open(self.temp_dir / "ray-start.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self._log = log
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {self.log_tail()}")
            if self._ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"Ray node not ready after {timeout} s: {self.log_tail()}")

    def _ready(self) -> bool:
        if self.head is not None:
            return "block forever" in self.log_tail()
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, n: int = 4000) -> str:
        try:
            return (self.temp_dir / "ray-start.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace: float = 20) -> None:
        """SIGTERM every process of this node's session, SIGKILL what is left after ``grace``."""
        if self.proc is None:
            return
        sid = self.proc.pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
            for pid in _session_pids(sid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while _session_pids(sid) and time.monotonic() < deadline:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=0.2)
            if not _session_pids(sid):
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._log.close()
        self.proc = None


@contextlib.contextmanager
def ray_head(temp_dir: Path, **kwargs) -> Iterator[RayNode]:
    node = RayNode(temp_dir, **kwargs).start()
    try:
        yield node
    finally:
        node.stop()
