"""The layers stay apart (the README's "Layout"): checked on the source, imports inside
functions included, and by importing every config module in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "covidray"
# Ray is imported only by the runtime module and by the Ray Data job's driver and stages.
RAY_ALLOWED = {"covidray/runtime/", "covidray/score/job.py", "covidray/score/stages.py"}
APART = ("train", "gan", "score")  # none of these packages imports another
CONFIG_MODULES = (
    "covidray.config",
    "covidray.evaluation.config",
    "covidray.gan.config",
    "covidray.report.config",
    "covidray.runtime.config",
    "covidray.score.config",
    "covidray.train.config",
    "serving.config",
)


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute names of every module ``path`` imports, anywhere in the file."""
    package = _module_name(path if path.name == "__init__.py" else path.parent, root)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def library_files() -> list[Path]:
    return sorted(LIBRARY.rglob("*.py"))


def test_import_walker_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    path = tmp_path / "covidray" / "gan" / "example.py"
    path.parent.mkdir(parents=True)
    path.write_text("def f():\n    import ray.data\n    from ..train import loop\n")
    assert {"ray.data", "covidray.train", "covidray.train.loop"} <= imports(path, tmp_path)


def test_train_gan_and_score_do_not_import_each_other() -> None:
    crossings = []
    for path in library_files():
        rel = path.relative_to(LIBRARY).parts
        if rel[0] not in APART:
            continue
        for name in imports(path):
            parts = name.split(".")
            if len(parts) > 1 and parts[0] == "covidray" and parts[1] in APART:
                if parts[1] != rel[0]:
                    crossings.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not crossings, crossings


def test_ray_is_imported_only_by_the_runtime_and_the_ray_data_job() -> None:
    offenders = []
    for path in library_files():
        rel = str(path.relative_to(ROOT))
        if any(rel.startswith(allowed) for allowed in RAY_ALLOWED):
            continue
        for name in imports(path):
            if name == "ray" or name.startswith("ray."):
                offenders.append(f"{rel} imports {name}")
    assert not offenders, offenders


@pytest.mark.parametrize("module", CONFIG_MODULES)
def test_config_modules_import_without_torch_kornia_or_ray(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "heavy = sorted({'torch', 'kornia', 'ray'} & set(sys.modules))\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"


def test_every_options_model_subclasses_the_one_base() -> None:
    """Every pydantic model named ``*Config`` in the library derives from config.Config."""
    import importlib

    from pydantic import BaseModel

    from covidray.config import Config

    strays = []
    for path in library_files():
        module = importlib.import_module(_module_name(path))
        for name, obj in vars(module).items():
            if (
                name.endswith("Config")
                and isinstance(obj, type)
                and issubclass(obj, BaseModel)
                and obj.__module__ == module.__name__
                and not issubclass(obj, Config)
            ):
                strays.append(f"{module.__name__}.{name}")
    assert not strays, strays
