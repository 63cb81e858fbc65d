"""A failed command is one clear line and a non-zero exit, never a traceback: a missing or
corrupted ``--model`` in every command that takes one, ``--device cuda`` without a GPU, an
unknown ``--layout`` (refused before the source is listed). ``-v`` works after the command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from covidray.cli import build_parser, main
from covidray.modeldir import ModelCard, save_model_dir
from covidray.models import build_model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A missing model directory and one whose weights file was damaged after saving."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", weights=None)
    bad = root / "corrupted"
    save_model_dir(model, ModelCard.for_model(model, 64, 64), str(bad))
    weights = bad / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    return {"missing": str(root / "no-such-model"), "corrupted": str(bad)}


def one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


COMMANDS = {
    "score": lambda m, d: ["score", "--model", m, "--data", d, "--out", d + "-out"],
    "evaluate": lambda m, d: ["evaluate", "--model", m, "--data", d],
    "calibrate": lambda m, d: ["calibrate", "--model", m, "--data", d],
    "gan generate": lambda m, d: ["gan", "generate", "--model", m, "--data", d, "--out", d + "-o"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", ["missing", "corrupted"])
def test_a_bad_model_is_one_line(models, command, kind, tmp_path: Path, capsys) -> None:
    if f" {command.split()[0]} " not in build_parser().format_help().replace("\n", " "):
        pytest.skip(f"no {command} command in this tree")
    argv = COMMANDS[command](models[kind], str(tmp_path / "data"))
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert models[kind] in line or "generator" in line, line
    if kind == "corrupted" and command != "gan generate":
        assert "does not match its model card" in line, line


def test_device_cuda_without_a_gpu_is_refused_before_waiting(tmp_path: Path, capsys) -> None:
    from covidray.score import ScoreConfig
    from covidray.score.job import plan_actors

    cfg = ScoreConfig(model="m", data="d", out="o", device="cuda")
    with pytest.raises(ValueError, match="no GPU"):
        plan_actors(cfg, {"CPU": 4.0}, {"CPU": 4.0}, 2)
    gpu = plan_actors(cfg, {"CPU": 4.0, "GPU": 1.0}, {"GPU": 1.0}, 2)
    assert gpu.device == "cuda" and gpu.resources == {"num_gpus": 1.0}
    if torch.cuda.is_available():
        return
    assert main(["evaluate", "--model", "m", "--data", "d", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in one_error_line(capsys)


def test_unknown_layout_is_refused_before_listing(tmp_path: Path, capsys) -> None:
    from covidray.config import IngestConfig

    with pytest.raises(ValueError, match="unknown layout 'bogus'"):
        IngestConfig(src=str(tmp_path / "never-listed"), dest=str(tmp_path / "d"), layout="bogus")
    argv = ["ingest", str(tmp_path / "never-listed"), str(tmp_path / "d"), "--layout", "bogus"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "unknown layout 'bogus'" in line and "class-folders" in line, line


def test_verbose_flag_after_the_command(tmp_path: Path, capsys, monkeypatch) -> None:
    """``-v`` before or after the command shows covidray's INFO lines on the console; without
    it they go to the log file only, whose path the console prints."""
    from PIL import Image

    monkeypatch.setenv("COVIDRAY_LOG_DIR", str(tmp_path / "logs"))
    for name, level in (("covid/a.png", 100), ("normal/b.png", 50)):
        path = tmp_path / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (40, 32), level).save(path)
    src = str(tmp_path / "src")
    assert build_parser().parse_args(["ingest", src, "d", "-v"]).verbose
    assert build_parser().parse_args(["-v", "ingest", src, "d"]).verbose
    assert not build_parser().parse_args(["ingest", src, "d"]).verbose

    assert main(["ingest", src, str(tmp_path / "d1"), "--size", "64", "-v"]) == 0
    assert "INFO covidray.ingest: ingest: layout class-folders" in capsys.readouterr().err
    assert main(["ingest", src, str(tmp_path / "d2"), "--size", "64"]) == 0
    err = capsys.readouterr().err
    assert "INFO" not in err
    logs = list((tmp_path / "logs").glob("ingest-*.log"))
    assert len(logs) == 1 and str(logs[0]) in err.replace("\n", "")
    assert "ingest: layout class-folders" in logs[0].read_text()
