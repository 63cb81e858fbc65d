"""Package attributes loaded on first use, so that importing a package stays cheap."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, **modules: str) -> tuple[Callable[[str], Any], list[str]]:
    """A module ``__getattr__`` for ``package`` and its ``__all__``.

    ``modules`` maps a submodule to the names it provides, space-separated; ``alias=name``
    exports the submodule's ``name`` as ``alias``:
    ``lazy_attributes(__name__, job="run_score", results="SCHEMA_ALIAS=SCHEMA")``."""
    where: dict[str, tuple[str, str]] = {}
    for module, names in modules.items():
        for entry in names.split():
            alias, _, attribute = entry.partition("=")
            where[alias] = (module, attribute or alias)

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attribute = where[name]
        return getattr(importlib.import_module(f".{module}", package), attribute)

    return __getattr__, list(where)
