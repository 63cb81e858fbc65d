"""The layers stay apart (docs/architecture in the README): checked on the source, imports
inside functions included, and by importing every config module in a fresh interpreter; and
no import cycle among the library's modules."""

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


def _from_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute name of the module a ``from … import`` statement reads from."""
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute names of every module ``path`` imports, anywhere in the file."""
    package = _module_name(path if path.name == "__init__.py" else path.parent, root)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(node, package)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_imports(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The modules of ``modules`` that ``path`` imports, anywhere in the file but under
    ``if TYPE_CHECKING:``. ``from . import x`` imports the module ``x`` (not the package) when
    ``x`` is one; ``from .m import name`` imports ``m``."""
    package = _module_name(path if path.name == "__init__.py" else path.parent, root)
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit_one(stmt)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(node, package)
            subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in modules]
            names.update(subs)
            if len(subs) < len(node.names):  # some names are attributes of ``module``
                names.add(module)
        else:
            visit(node)

    visit(ast.parse(path.read_text(), str(path)))
    found = set()
    for name in names:
        while name and name not in modules:  # ``import a.b.c`` of a name inside a module
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    found.discard(_module_name(path, root))
    return found


def import_cycles(package_dir: Path, root: Path = ROOT) -> list[list[str]]:
    """Every cycle of imports among the modules under ``package_dir`` (strongly connected
    components of two or more modules), each as its sorted module names."""
    paths = {_module_name(p, root): p for p in sorted(package_dir.rglob("*.py"))}
    graph = {name: module_imports(path, set(paths), root) for name, path in paths.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in graph:
        if name not in index:
            connect(name)
    return cycles


def library_files() -> list[Path]:
    return sorted(LIBRARY.rglob("*.py"))


def test_import_walker_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    path = tmp_path / "covidray" / "gan" / "example.py"
    path.parent.mkdir(parents=True)
    path.write_text("def f():\n    import ray.data\n    from ..train import loop\n")
    assert {"ray.data", "covidray.train", "covidray.train.loop"} <= imports(path, tmp_path)


def test_no_import_cycle_among_library_modules() -> None:
    assert import_cycles(LIBRARY) == []


def test_a_cycle_in_a_package_is_found(tmp_path: Path) -> None:
    """The check above can fail: a cycle through a function-level import and a
    ``from . import module`` is found; a TYPE_CHECKING import and a package import are not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from .b import thing\n",
        "b.py": "def thing():\n    from .sub import c\n",
        "sub/__init__.py": "from .. import d\n",  # imports pkg.d, not pkg
        "sub/c.py": "from ..a import x\n",  # a -> b -> sub.c -> a
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub import c\n",
        "e.py": "from . import a\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    assert import_cycles(pkg, tmp_path) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    # The same without the function-level import: no cycle.
    (pkg / "b.py").write_text("def thing():\n    pass\n")
    assert import_cycles(pkg, tmp_path) == []
    # A TYPE_CHECKING import back does not make one; a real one does.
    (pkg / "b.py").write_text("from . import d\n")
    (pkg / "d.py").write_text("from . import b\n")
    assert import_cycles(pkg, tmp_path) == [["pkg.b", "pkg.d"]]


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
