"""The console shows covidray's output only; Ray's goes to a log file whose path is printed.

``covidray ingest`` with Ray tasks (``--parallel-threshold 0``) in a fresh process, which
starts a local Ray: by default none of Ray's lines reach the console and the printed log file
holds them; with ``-v`` they are on the console.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

RAY_LINES = ("Started a local Ray instance", "(pid=", "raylet", "core_worker", "INFO worker.py")


def run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    src = tmp_path / "src"
    for name, level in (("covid/a.png", 100), ("normal/b.png", 50), ("normal/c.png", 20)):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (40, 32), level).save(src / name)
    dest = tmp_path / f"ds{len(list(tmp_path.glob('ds*')))}"
    env = {**os.environ, "COVIDRAY_LOG_DIR": str(tmp_path / "logs"), "COLUMNS": "250"}
    env.pop("RAY_ADDRESS", None)
    argv = [sys.executable, "-m", "covidray.cli", "ingest", str(src), str(dest), "--size", "64"]
    argv += ["--parallel-threshold", "0", "--chunk-size", "1", *extra]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # starts a local Ray
def test_ray_output_goes_to_the_printed_log_file(tmp_path: Path) -> None:
    quiet = run(tmp_path)
    console = quiet.stdout + quiet.stderr
    for marker in RAY_LINES:
        assert marker not in console, (marker, console[-3000:])
    assert "images ingested" in console  # ours: the summary table
    found = re.search(r"log file \(Ray and more\): (\S+\.log)", quiet.stderr)
    assert found, quiet.stderr[-3000:]
    log = Path(found.group(1))
    assert log.parent == tmp_path / "logs"
    assert "Started a local Ray instance" in log.read_text(errors="replace")

    verbose = run(tmp_path, "-v")
    assert "Started a local Ray instance" in verbose.stdout + verbose.stderr


def test_lines_are_not_wrapped_when_output_is_no_terminal(tmp_path: Path) -> None:
    """Output to a pipe (CI logs, files, `covidray submit` following a job) keeps each line
    whole, however long; rich's default there would wrap it at 80 columns."""
    dest = tmp_path / ("a-folder-name-long-enough-that-the-line-passes-eighty-columns" * 2) / "ds"
    env = {**os.environ, "COVIDRAY_LOG_DIR": str(tmp_path / "logs")}
    env.pop("COLUMNS", None)
    argv = [sys.executable, "-m", "covidray.cli", "synth", str(dest), "--n-per-class", "1"]
    proc = subprocess.run([*argv, "--size", "64"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = f"wrote 3 phantoms: {dest / 'manifest.csv'}"
    assert len(line) > 120 and line in proc.stderr.splitlines(), proc.stderr


def test_the_epoch_line_stays_one_line_in_a_file() -> None:
    import io

    from covidray.cli.render import CliConsole, train_epoch_line, width_for

    m = {"epoch": 11, "start_epoch": 0, "train_loss": 0.41234, "val_loss": 0.52345}
    m |= {"val_macro_f1": 0.879, "val_accuracy": 0.899, "val_covid_recall": 0.812, "lr": 3e-4}
    m |= {"best_val_macro_f1": 0.879, "best_epoch": 11, "epoch_s": 61.0}
    out = io.StringIO()
    CliConsole(file=out, width=width_for(out)).print(train_epoch_line(m, 18), highlight=False)
    CliConsole(file=out, width=width_for(out)).rule("a header")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and len(lines[0]) > 80 and lines[0].startswith("epoch  12/18")
    assert len(lines[1]) == 80  # header rules keep a terminal's width
