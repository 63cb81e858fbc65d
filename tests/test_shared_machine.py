"""Commands that share the machine with someone else's Ray.

An unrelated Ray runs on this machine (``ray start --head`` with its own temp dir, which records
its address where Ray's clients look for "the" local cluster: ``$TMPDIR/ray/ray_current_cluster``).
``covidray score`` and ``covidray serve``, started without ``RAY_ADDRESS`` in the same
environment, must start a Ray of their own and leave the unrelated one alone: no driver, no
actor, no task of theirs on it, and it still runs when they are done. (Before, Ray's
``ray.init()`` without an address joined the recorded cluster.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from raynodes import RayNode, node_env
from serveproc import covidray_serve
from tinymodels import png_bytes, save_tiny_model

from covidray.runtime.cluster import free_port

CLI = [sys.executable, "-m", "covidray.cli"]


class Machine:
    """The unrelated Ray and the environment every command below runs in (same ``TMPDIR``)."""

    def __init__(self, node: RayNode, env: dict[str, str]) -> None:
        self.node = node
        self.env = env

    def untouched(self) -> None:
        """No driver, actor or task of anyone else ever ran on the unrelated Ray; it runs."""
        jobs = self.node.get_json("/api/jobs/")
        assert jobs == [], jobs
        for kind in ("actors", "tasks"):
            found = self.node.get_json(f"/api/v0/{kind}?limit=100")["data"]["result"]["result"]
            assert found == [], (kind, found)
        alive = [n for n in self.node.nodes() if n["state"] == "ALIVE"]
        assert [n["node_id"] for n in alive] == [self.node.node_id]


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    # A short root: Ray's socket paths under TMPDIR/ray/session_*/ must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="crm", dir="/tmp"))
    env = node_env(root)  # TMPDIR=root/tmp
    node = RayNode(Path(env["TMPDIR"]) / "ray", num_cpus=1, env=env)
    try:
        node.start()
        recorded = node.temp_dir / "ray_current_cluster"  # where ray.init() looks
        deadline = time.monotonic() + 60  # `ray start` writes it after the node is up
        while not recorded.is_file():
            assert time.monotonic() < deadline, node.log_tail()
            time.sleep(0.5)
        # The commands: the test session's environment (its S3 server too), that TMPDIR.
        cmd_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        cmd_env.update(TMPDIR=env["TMPDIR"], COVIDRAY_LOG_DIR=str(root / "logs"))
        yield Machine(node, cmd_env)
    finally:
        node.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_score_starts_its_own_ray_beside_an_unrelated_one(machine: Machine, tmp_path: Path):
    model, data, out = tmp_path / "model", tmp_path / "in", tmp_path / "out"
    save_tiny_model(str(model), seed=3)
    data.mkdir()
    for i in range(4):
        (data / f"img{i}.png").write_bytes(png_bytes(i))
    argv = ["score", "--model", str(model), "--data", str(data), "--out", str(out)]
    argv += ["--workers", "1", "--threads", "1", "--batch-size", "2"]
    proc = subprocess.run(CLI + argv, capture_output=True, text=True, env=machine.env, timeout=480)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n_scored"] == 4 and result["n_errors"] == 0
    machine.untouched()


def test_serve_starts_its_own_ray_beside_an_unrelated_one(machine: Machine, tmp_path: Path):
    model = tmp_path / "model"
    save_tiny_model(str(model), seed=4)
    port = free_port()
    argv = ["--model", str(model), "--port", str(port), "--replicas", "1"]
    argv += ["--threads", "1", "--num-cpus", "0.5", "--max-batch-size", "2"]
    env = {k: v for k, v in machine.env.items() if k != "COVIDRAY_API_TOKEN"}
    with covidray_serve(argv, env):
        r = requests.post(
            f"http://127.0.0.1:{port}/v1/predict",
            data=png_bytes(9),
            headers={"Content-Type": "image/png"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        machine.untouched()  # while it serves, too
    machine.untouched()
