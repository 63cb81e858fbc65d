"""A real two-node Ray cluster on this machine: the proof that nothing in covidray assumes one.

A head and a second node (``ray start --address``), each with one CPU, resources and a
``--temp-dir`` of its own, HOME and TMPDIR inside it, and the moto server's endpoint and test
credentials in its environment (as a pod gets them). Through ``covidray submit``, with every
input and output an ``s3://`` URI: a 2-worker ``train --epochs 1`` on phantoms, then ``score
--workers 2``; Ray's state API must show both jobs' workers on both nodes (by node id). A second
scoring submission while the first holds the output's lock exits with a clear message. No
process of a node holds a file open for writing outside its own temp dir, and Ray's, torch's and
matplotlib's default places gain nothing. The scores equal a one-node run's to 1e-4.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from nodefiles import WriteWatch, default_places, new_in_default_places
from raynodes import RayNode, node_env, stop_nodes
from scorefiles import read_lock

from covidray import storage
from covidray.cli import main
from covidray.modeldir import read_card
from covidray.runtime.config import JobsConfig
from covidray.runtime.jobs import Jobs

PROBS = ("prob_covid", "prob_pneumonia", "prob_normal")


@pytest.fixture
def bucket(s3_server) -> str:
    import boto3

    name = f"nodes-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def dataset(bucket: str) -> str:
    """6 phantoms per class at 64 px, ingested to S3 (here, in this process)."""
    from covidray.config import IngestConfig, SplitConfig
    from covidray.ingest import ingest
    from covidray.synth import write_phantoms

    write_phantoms(f"{bucket}/raw", 6, seed=1, size=64)
    # Split seed 8: its keyed-hash split puts patients of every class in train and val.
    split = SplitConfig(seed=8)
    ingest(IngestConfig(src=f"{bucket}/raw", dest=f"{bucket}/ds", size=64, split=split))
    return f"{bucket}/ds"


def _aws_env() -> dict[str, str]:
    keys = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    return {k: os.environ[k] for k in keys}


def _node(temp_dir: Path, head: RayNode | None, slot: str) -> RayNode:
    # A node joins another only in Ray's cluster mode (the session's Rays run single-machine,
    # tests/conftest.py); in it ``ray start`` registers the nodes under the machine's address.
    env = node_env(temp_dir, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", **_aws_env())
    return RayNode(
        temp_dir, head=head, num_cpus=1, resources={slot: 1}, env=env, object_store_mb=256
    )


def _ray_job_id(jobs: Jobs, submission_id: str) -> str:
    return jobs.info(submission_id).job_id


def _nodes_of(head: RayNode, ray_job_id: str, class_part: str) -> set[str]:
    """Node ids of the job's actors whose class name contains ``class_part`` (state API)."""
    actors = head.get_json("/api/v0/actors?limit=10000&detail=1")["data"]["result"]["result"]
    return {
        a["node_id"] for a in actors if a["job_id"] == ray_job_id and class_part in a["class_name"]
    }


def _driver_pid(head: RayNode, out: str) -> int:
    """The process id of the job driver scoring into ``out`` (on the head)."""
    for pid in head.pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"covidray.cli" in argv and out.encode() in argv:  # python, not its `sh -c`
            return pid
    raise AssertionError("no scoring driver on the head")


def _wait_for(predicate, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _scores(out: str):
    from covidray.score import read_predictions

    return read_predictions(out).to_pandas().set_index("image_id").sort_index()


def test_the_write_watch_sees_a_file_held_open_outside_a_node_s_temp_dir(tmp_path: Path) -> None:
    """The watch itself: a process of a (stand-in) node writing inside and outside."""
    inside, outside = tmp_path / "node" / "log.txt", tmp_path / "elsewhere.txt"
    inside.parent.mkdir()
    code = "import sys, time; a, b = open(sys.argv[1], 'w'), open(sys.argv[2], 'a'); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(inside), str(outside)])
    node = SimpleNamespace(temp_dir=inside.parent, pids=lambda: [proc.pid])
    try:
        with WriteWatch([node], interval=0.05) as watch:
            _wait_for(lambda: watch.outside, "the watch to see the file", timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert list(watch.outside) == [str(outside)] and proc.pid in watch.pids


def test_train_and_score_on_two_nodes_from_s3_like_one_node(
    dataset: str, bucket: str, capfd, request
) -> None:
    run, two, one = f"{bucket}/run", f"{bucket}/scores-2n", f"{bucket}/scores-1n"
    model = f"{run}/model"
    temps = [Path(tempfile.mkdtemp(prefix=p, dir="/tmp")) for p in ("crh", "crw")]
    before = default_places()
    head = _node(temps[0], None, "head_slot")
    worker = _node(temps[1], head, "worker_slot")
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(stop_nodes, head, worker)
            head.start()
            worker.start()
            watch = stack.enter_context(WriteWatch([head, worker]))
            assert head.node_id and worker.node_id and head.node_id != worker.node_id
            both = {head.node_id, worker.node_id}
            # Each node keeps its session under its own --temp-dir (Ray's own record).
            for entry in head.get_json("/nodes?view=summary")["data"]["summary"]:
                raylet = entry["raylet"]
                node = head if raylet["nodeId"] == head.node_id else worker
                assert raylet["sessionDir"].startswith(str(node.temp_dir) + os.sep)
            url = head.dashboard_url
            jobs = Jobs(JobsConfig(address=url))

            # Training: 2 workers, one on each node (each node has one CPU).
            train = [
                "--data", dataset, "--out", run, "--epochs", "1", "--workers", "2",
                "--weights", "none", "--input-size", "64", "--batch-size", "4",
            ]  # fmt: skip
            assert main(["submit", "train", "--address", url, "--", *train]) == 0
            assert storage.exists(f"{model}/weights.safetensors")
            train_job = [j for j in jobs.list() if j.metadata.get("covidray_command") == "train"]
            assert _nodes_of(head, train_job[-1].job_id, "RayTrainWorker") == both

            # Scoring with 2 actors; a second submission on the same output meanwhile.
            score = ["--model", model, "--data", dataset, "--out", two, "--batch-size", "4"]
            submit = ["submit", "score", "--address", url]
            assert main([*submit, "--no-wait", "--", *score, "--workers", "2"]) == 0
            first = capfd.readouterr().out.strip().splitlines()[-1]
            _wait_for(lambda: read_lock(two) is not None, "the first run's lock")
            # Freeze the first run while it holds the lock, however slow this machine is.
            driver = _driver_pid(head, two)
            os.kill(driver, signal.SIGSTOP)
            try:
                assert main([*submit, "--", *score]) == 2
                assert "another covidray score run is writing to this output" in (
                    capfd.readouterr().out
                )
            finally:
                os.kill(driver, signal.SIGCONT)
            assert main(["jobs", "logs", first, "--follow", "--address", url]) == 0
            assert _nodes_of(head, _ray_job_id(jobs, first), "ScoreWorker") == both
            assert read_lock(two) is None  # released at the end
        assert watch.samples > 10
        assert not watch.outside, watch.outside
        assert not new_in_default_places(before, watch.pids)
    finally:
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)

    # The same scoring on one node (the session's local Ray), one actor.
    request.getfixturevalue("ray_cluster")
    from covidray.score import ScoreConfig, run_score

    run_score(ScoreConfig(model=model, data=dataset, out=one, batch_size=4, workers=1))
    a, b = _scores(two), _scores(one)
    n = storage.read_parquet(f"{dataset}/manifest.parquet").num_rows
    assert len(a) == len(b) == n and list(a.index) == list(b.index)
    assert a["error"].isna().all()
    np.testing.assert_allclose(a[list(PROBS)].to_numpy(), b[list(PROBS)].to_numpy(), atol=1e-4)
    np.testing.assert_allclose(a["ood_score"], b["ood_score"], rtol=1e-3, atol=1e-3)
    # Labels (null where the input gate refused a phantom of this 1-epoch model) and verdicts:
    # equal, except for a film whose image distance lies on the gate's threshold (at 1 % of
    # val, the farthest val film's), where float sums in another thread layout may tip it.
    threshold = read_card(model).gate.threshold
    on_threshold = (a["ood_score"] - threshold).abs() <= 1e-3 * max(1.0, abs(threshold))
    for column in ("label", "in_scope", "gate_reason"):
        differs = a[column].fillna("-") != b[column].fillna("-")
        assert not (differs & ~on_threshold).any(), (column, a[differs], b[differs])
