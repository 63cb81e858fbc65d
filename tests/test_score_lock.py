"""The scoring job's lock on its output (``OUT/_lock.json``), on a local folder and on S3 (the
moto server): one holder at a time, a clear refusal, a heartbeat, stale locks of killed or
frozen runs taken over by exactly one newcomer, and ``covidray score`` refusing to start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from scorefiles import read_lock

from covidray import storage
from covidray.score.lock import LOCK_NAME, LockHeld, LockRecord, OutputLock

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path: Path) -> str:
    """An empty output folder: local, or a prefix of a fresh bucket on the moto server."""
    if request.param == "local":
        return str(tmp_path / "scores")
    return f"{request.getfixturevalue('s3_bucket')}/scores"


def _lock_uri(out: str) -> str:
    return storage.join(out, LOCK_NAME)


def _write_record(out: str, run_id: str, heartbeat_ago_s: float, stale_after_s: float = 60) -> None:
    """A lock as a run that died ``heartbeat_ago_s`` ago left it."""
    beat = datetime.now(UTC) - timedelta(seconds=heartbeat_ago_s)
    record = LockRecord(
        run_id=run_id, started_at=beat, heartbeat_at=beat, stale_after_s=stale_after_s
    )
    storage.write_bytes(_lock_uri(out), record.model_dump_json().encode())


def test_the_lock_holds_a_run_id_and_times_only(out: str) -> None:
    with OutputLock(out) as lock:
        raw = storage.read_bytes(_lock_uri(out))
        record = json.loads(raw)
        assert set(record) == {"kind", "run_id", "started_at", "heartbeat_at", "stale_after_s"}
        assert record["run_id"] == lock.run_id and lock.held
        text = raw.decode()
        assert socket.gethostname() not in text and str(os.getpid()) not in text
        assert storage.normalize(out).split("://")[-1] not in text
    assert not storage.exists(_lock_uri(out))  # released
    with OutputLock(out):  # and free again
        pass


def test_a_second_run_is_refused_with_a_clear_message(out: str) -> None:
    with OutputLock(out) as first:
        with pytest.raises(LockHeld) as refused:
            OutputLock(out).acquire()
        assert isinstance(refused.value, ValueError)  # the CLI prints it and exits 2
        message = str(refused.value)
        assert "another covidray score run" in message and first.run_id[:8] in message
        assert "\n" not in message and storage.normalize(out).split("://")[-1] not in message
        assert read_lock(out).run_id == first.run_id  # the refused run left it alone


def test_the_heartbeat_keeps_a_long_run_s_lock(out: str) -> None:
    with OutputLock(out, stale_after_s=3.0) as lock:
        started = read_lock(out).heartbeat_at
        time.sleep(6.0)  # far longer than stale_after_s: only the heartbeat keeps it live
        assert read_lock(out).heartbeat_at > started
        with pytest.raises(LockHeld):
            OutputLock(out).acquire()
        assert lock.held


def test_a_dead_run_s_stale_lock_is_taken_over(out: str) -> None:
    _write_record(out, "d" * 32, heartbeat_ago_s=3600)
    with OutputLock(out) as lock:
        assert read_lock(out).run_id == lock.run_id
    assert not storage.exists(_lock_uri(out))


HOLDER = """
import json, sys, time
from covidray.score.lock import OutputLock
lock = OutputLock(sys.argv[1], stale_after_s=float(sys.argv[2]))
lock.acquire()
print(json.dumps({"held": lock.run_id}), flush=True)
deadline = time.monotonic() + 60
while not lock.lost and time.monotonic() < deadline:
    time.sleep(0.05)
lock.release()
print(json.dumps({"lost": lock.lost}), flush=True)
"""


def _holder(out: str, stale_after_s: float) -> tuple[subprocess.Popen, str]:
    """A process holding ``out``'s lock; returns it and its run id."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, out, str(stale_after_s)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    line = proc.stdout.readline()
    assert line, "the holder did not take the lock"
    return proc, json.loads(line)["held"]


def test_a_killed_run_s_lock_goes_stale_and_is_taken_over(out: str) -> None:
    proc, dead = _holder(out, stale_after_s=8.0)  # long enough for a loaded machine
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    with pytest.raises(LockHeld):  # its last heartbeat is recent
        OutputLock(out).acquire()
    time.sleep(8.5)
    with OutputLock(out) as lock:
        assert read_lock(out).run_id == lock.run_id != dead


def test_a_frozen_holder_whose_lock_was_taken_notices_and_leaves_it(out: str) -> None:
    proc, frozen = _holder(out, stale_after_s=1.0)
    try:
        proc.send_signal(signal.SIGSTOP)  # a run that hangs: no heartbeat
        time.sleep(1.5)
        with OutputLock(out, stale_after_s=30) as lock:
            assert read_lock(out).run_id == lock.run_id != frozen
            proc.send_signal(signal.SIGCONT)
            stdout, _ = proc.communicate(timeout=30)
            assert json.loads(stdout.splitlines()[-1]) == {"lost": True}
            assert read_lock(out).run_id == lock.run_id  # its release left ours alone
            assert lock.held
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()


def _contend(out: str, barrier: threading.Barrier, won: list, refused: list) -> None:
    lock = OutputLock(out)
    barrier.wait()
    try:
        lock.acquire()
        won.append(lock)
    except LockHeld as err:
        refused.append(err)


def test_of_two_runs_finding_a_stale_lock_exactly_one_takes_it(out: str) -> None:
    for round_ in range(3):
        _write_record(out, f"{round_:032d}", heartbeat_ago_s=3600)
        barrier = threading.Barrier(2)
        won: list[OutputLock] = []
        refused: list[LockHeld] = []
        threads = [
            threading.Thread(target=_contend, args=(out, barrier, won, refused)) for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(won) == 1 and len(refused) == 1, (won, refused)
        assert read_lock(out).run_id == won[0].run_id
        won[0].release()


def test_an_unreadable_lock_is_judged_by_its_age(tmp_path: Path) -> None:
    out = str(tmp_path / "scores")
    uri = _lock_uri(out)
    storage.write_bytes(uri, b"")  # a write cut short
    with pytest.raises(LockHeld):
        OutputLock(out, stale_after_s=60).acquire()
    old = time.time() - 120
    os.utime(uri, (old, old))
    with OutputLock(out, stale_after_s=60) as lock:
        assert read_lock(out).run_id == lock.run_id


def test_a_run_waits_for_the_lock_when_told_to(out: str) -> None:
    first = OutputLock(out)
    first.acquire()
    threading.Timer(1.0, first.release).start()
    t0 = time.monotonic()
    with OutputLock(out, wait_s=30) as second:
        assert read_lock(out).run_id == second.run_id
    assert 0.5 < time.monotonic() - t0 < 30


def test_covidray_score_refuses_a_locked_output_and_releases_its_own(s3_bucket: str, capfd) -> None:
    from covidray.cli import main

    out = f"{s3_bucket}/scores"
    argv = ["score", "--model", f"{s3_bucket}/no-model", "--data", f"{s3_bucket}/ds", "--out", out]
    with OutputLock(out):
        capfd.readouterr()
        assert main(argv) == 2
        err = capfd.readouterr().err
        error = " ".join(err[err.index("error:") :].split())  # as one line, unwrapped
        assert error.startswith("error: another covidray score run is writing to this output")
        assert "Try again when that run ends." in error
        assert s3_bucket.split("://")[1] not in error
    # Unlocked: the run goes on, fails on the missing model, and leaves no lock behind.
    from covidray.modeldir import ModelLoadError
    from covidray.score import ScoreConfig, run_score

    cfg = ScoreConfig(model=f"{s3_bucket}/no-model", data=f"{s3_bucket}/ds", out=out)
    with pytest.raises(ModelLoadError):
        run_score(cfg)
    assert not storage.exists(_lock_uri(out))
    with OutputLock(out), pytest.raises(ModelLoadError):  # the lock can be turned off
        run_score(cfg.model_copy(update={"lock": False}))
