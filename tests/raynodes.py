"""Real Ray nodes for tests: ``ray start --head`` (and more nodes) on 127.0.0.1.

Each node runs ``ray start --block`` in a session of its own, with its own ``--temp-dir`` and
free ports, so it never meets the test session's Ray or another test's. ``stop()`` ends that
session's processes by their own ids (never ``ray stop``, which stops every Ray on the machine).

A node other than the head is ready once the head's state API lists it alive; each node knows
its Ray node id (``node_id``). Ray 2.60's ``ray start`` replaces a loopback
``--node-ip-address`` with the host's address (``resolve_ip_for_localhost``), so nodes
register under that address; the dashboard and Jobs API listen on 127.0.0.1 only. A head
started with ``RAY_AUTH_MODE=token`` in its environment is asked with its ``RAY_AUTH_TOKEN``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from covidray.runtime.cluster import free_port

RAY = str(Path(sys.executable).with_name("ray"))


def _session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` and all their descendants: Ray's job supervisor starts
    each job's driver in a session of its own."""
    parents: dict[int, int] = {}
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z":  # zombies are gone already
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        if int(fields[3]) == sid:  # session id
            members.add(pid)
    found = set(members)
    for pid in parents:
        chain, p = [], pid
        while p > 1 and p not in found and p in parents and len(chain) < 64:
            chain.append(p)
            p = parents[p]
        if p in found:
            found.update(chain)
    return sorted(found)


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
        object_store_mb: int | None = None,
    ) -> None:
        self.temp_dir = Path(temp_dir)
        self.head = head
        self.num_cpus = num_cpus
        # A resource of its own, by which the head's state API tells this node from the others.
        self.tag = f"raynode-{uuid.uuid4().hex[:8]}"
        self.resources = {**(resources or {}), self.tag: 1}
        self.env = dict(os.environ if env is None else env)  # the node's whole environment
        self.object_store_mb = object_store_mb
        self.gcs_port = head.gcs_port if head else free_port()
        self.dashboard_port = head.dashboard_port if head else free_port()
        self.node_id: str | None = None
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
        cmd.append(f"--resources={json.dumps(self.resources)}")
        if self.object_store_mb:
            cmd.append(f"--object-store-memory={self.object_store_mb * 2**20}")
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
        if self.head is None and not self._answers("/api/version"):
            return False
        node = next((n for n in self.nodes() if self.tag in n["resources_total"]), None)
        if node is None or node["state"] != "ALIVE":
            return False
        self.node_id = node["node_id"]
        return True

    def _answers(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self._request(path), timeout=5) as r:
                return r.status == 200
        except urllib.error.HTTPError as err:
            return err.code in (401, 403)  # up, with token authentication
        except OSError:
            return False

    def _request(self, path: str) -> urllib.request.Request:
        token = (self.head or self).env.get("RAY_AUTH_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return urllib.request.Request(self.dashboard_url + path, headers=headers)

    def get_json(self, path: str) -> dict:
        """GET a JSON document from the head's dashboard (state API, Jobs API)."""
        with urllib.request.urlopen(self._request(path), timeout=30) as r:
            return json.loads(r.read())

    def nodes(self) -> list[dict]:
        """The cluster's nodes as the head's state API lists them ([] while it cannot)."""
        try:
            return self.get_json("/api/v0/nodes?limit=1000")["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return []

    def pids(self) -> list[int]:
        """The ids of this node's processes (its ``ray start`` session)."""
        return _session_pids(self.proc.pid) if self.proc is not None else []

    def log_tail(self, n: int = 4000) -> str:
        try:
            return (self.temp_dir / "ray-start.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace: float = 3) -> None:
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


def stop_nodes(*nodes: RayNode) -> None:
    """Stop several nodes at once (each drains for a while after SIGTERM)."""
    threads = [threading.Thread(target=node.stop) for node in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@contextlib.contextmanager
def ray_head(temp_dir: Path, **kwargs) -> Iterator[RayNode]:
    node = RayNode(temp_dir, **kwargs).start()
    try:
        yield node
    finally:
        node.stop()


def node_env(temp_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a test node, as a pod's: this interpreter's ``bin`` first on PATH (the
    image's Python), HOME and TMPDIR inside the node's temp dir, no usage reports, Ray's auth
    mode ``disabled`` unless ``extra`` says; the caller adds storage settings and credentials."""
    home, tmp = Path(temp_dir) / "home", Path(temp_dir) / "tmp"
    home.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (tests/conftest.py): a single-machine Ray, on 127.0.0.1.
    keep = ("LANG", "LC_ALL", "TZ", "USER", "LOGNAME", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.defpath]),
        HOME=str(home),
        TMPDIR=str(tmp),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
        AWS_EC2_METADATA_DISABLED="true",
    )
    env.update(extra)
    return env
