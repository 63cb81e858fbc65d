"""``covidray serve`` as a user runs it: a subprocess in a session of its own, ready once it
prints "endpoint ready", stopped with Ctrl-C (SIGINT), killed with its session if it hangs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator


@contextlib.contextmanager
def covidray_serve(args: list[str], env: dict[str, str], ready_s: float = 300) -> Iterator[str]:
    """Run ``covidray serve ARGS`` and yield what it printed up to "endpoint ready"; on exit
    send SIGINT and require exit status 0 and no Ray shutdown noise on the console."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "covidray.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        start_new_session=True,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + ready_s
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "endpoint ready" in line or proc.poll() is not None:
                break
        printed = "".join(lines)
        assert "endpoint ready" in printed, printed[-3000:]
        yield printed
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (out + err)[-3000:]
        # Ray's shutdown lines ("(raylet) Task ServeController.graceful_shutdown failed ...")
        # go to the log file with the rest of Ray's output, never to the console.
        assert "(raylet)" not in out + err and "graceful_shutdown" not in out + err, out + err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
