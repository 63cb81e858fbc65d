"""Command-line flags derived from a pydantic config model, and the config built back from them.

Every field of scalar type becomes ``--field-name`` (nested models: ``--parent-field``), typed
and checked by the model itself; its description is the help text. Secrets (``SecretStr``)
never become flags, and mappings are left to the YAML file. A flag that is not given is
absent from the namespace (``argparse.SUPPRESS``), so the YAML file (``--config``) and the
model's defaults decide; a given flag overrides them.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr

from ..config import load_config

PREFIX = "cfg:"  # namespace attributes that hold config values; "a|b" sets several fields
Parser = argparse.ArgumentParser | argparse._ArgumentGroup


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _argparse_kwargs(tp: Any) -> dict[str, Any] | None:
    """How argparse reads a value of type ``tp`` (None: not a flag)."""
    tp = _strip_optional(tp)
    origin = get_origin(tp)
    if tp is SecretStr or tp is dict or origin is dict:
        return None
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if tp in (int, float, str):
        return {"type": tp}
    if origin is Literal:
        choices = get_args(tp)
        return {"choices": choices, "type": type(choices[0])}
    if origin is tuple:
        items = get_args(tp)
        if len(items) == 2 and items[1] is Ellipsis:
            return {"nargs": "+", "type": items[0]}
        if items and all(i is items[0] for i in items) and items[0] in (int, float, str):
            return {"nargs": len(items), "type": items[0]}
        return None
    if origin is list and get_args(tp) == (str,):
        return {"type": str, "action": "append"}  # given twice: both; commas are for the model
    return None


def model_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted name, FieldInfo)`` of every field that can be a flag, nested models flattened."""
    for name, info in model.model_fields.items():
        inner = _strip_optional(info.annotation)
        if _is_model(inner):
            yield from model_fields(inner, f"{prefix}{name}.")
        elif _argparse_kwargs(info.annotation) is not None:
            yield f"{prefix}{name}", info


def _help(info: Any) -> str:
    text = info.description or ""
    if not info.is_required() and info.default_factory is None:
        default = info.default
        shown = default if not isinstance(default, tuple) else " ".join(map(str, default))
        text = f"{text} (default: {shown})" if text else f"default: {shown}"
    return text.replace("%", "%%")


@dataclass(frozen=True)
class Command:
    """A sub-command whose flags come from ``model`` (``flags``: :func:`add_model_flags`'s
    options), with ``--config`` (a YAML file of the model's fields) unless ``config=False``."""

    name: str
    model: type[BaseModel]
    func: Callable[[argparse.Namespace], int]
    help: str
    flags: dict[str, Any] = field(default_factory=dict)
    config: bool = True
    extra: tuple[tuple[str, dict[str, Any]], ...] = ()  # flags outside the model

    def register(
        self, sub: argparse._SubParsersAction, parents: Iterable[argparse.ArgumentParser]
    ) -> argparse.ArgumentParser:
        parser = sub.add_parser(self.name, parents=list(parents), help=self.help)
        add_model_flags(parser, self.model, **self.flags)
        for flag, kwargs in self.extra:
            parser.add_argument(flag, **kwargs)
        if self.config:
            parser.add_argument("--config", help=f"YAML file with {self.model.__name__} fields")
        parser.set_defaults(func=self.func)
        return parser


def add_model_flags(
    parser: Parser,
    model: type[BaseModel],
    *,
    main: str = "",
    positional: str = "",
    aliases: Mapping[str, str | tuple[str, ...]] | None = None,
    metavars: Mapping[str, Any] | None = None,
    helps: Mapping[str, str] | None = None,
    skip: Iterable[str] = (),
) -> None:
    """Add a flag for every field of ``model`` (see the module docstring).

    ``positional`` fields (space-separated names) become positional arguments; ``aliases``
    maps a flag to the dotted field(s) it sets instead of the derived name
    (``{"--from": "domain_a"}``; a tuple sets several fields at once); ``main`` fields
    (space-separated; and aliases, positionals) are listed first, the rest under "more
    options"; ``metavars`` and ``helps`` override a flag's defaults (keyed by field or by
    alias without its dashes)."""
    main, positional = main.split(), positional.split()
    aliases = dict(aliases or {})
    metavars = dict(metavars or {})
    helps = dict(helps or {})
    fields = dict(model_fields(model))
    aliased = {f for targets in aliases.values() for f in _targets(targets)}
    main_set = set(main) | aliased
    more = parser.add_argument_group("more options (also settable in the --config YAML file)")
    for name in positional:
        kwargs = _argparse_kwargs(fields[name].annotation) or {}
        parser.add_argument(PREFIX + name, metavar=name, help=fields[name].description, **kwargs)
    for flag, targets in aliases.items():
        first = fields[_targets(targets)[0]]
        key = flag.lstrip("-")
        parser.add_argument(
            flag,
            dest=PREFIX + "|".join(_targets(targets)),
            default=argparse.SUPPRESS,
            help=helps.get(key, _help(first)),
            **_with_metavar(_argparse_kwargs(first.annotation), metavars.get(key), key),
        )
    for name, info in fields.items():
        if name in positional or name in aliased or name in skip:
            continue
        flag = "--" + name.replace(".", "-").replace("_", "-")
        target = parser if name in main_set else more
        target.add_argument(
            flag,
            dest=PREFIX + name,
            default=argparse.SUPPRESS,
            help=helps.get(name, _help(info)),
            **_with_metavar(_argparse_kwargs(info.annotation), metavars.get(name), flag),
        )


def _with_metavar(kwargs: dict[str, Any] | None, metavar: Any, flag: str) -> dict[str, Any]:
    """argparse options with a readable metavar (``--batch-size BATCH_SIZE``)."""
    kwargs = dict(kwargs or {})
    if metavar is not None:
        kwargs["metavar"] = metavar
    elif "choices" not in kwargs and kwargs.get("action") in (None, "append"):
        kwargs["metavar"] = flag.strip("-").replace("-", "_").upper()
    return kwargs


def _targets(targets: str | tuple[str, ...]) -> tuple[str, ...]:
    return (targets,) if isinstance(targets, str) else tuple(targets)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The config values given on the command line, as a nested mapping."""
    flat: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key.startswith(PREFIX):
            for name in key[len(PREFIX) :].split("|"):
                flat[name] = list(value) if isinstance(value, list) else value
    return _nest(flat)


def config_from_args(model: type[BaseModel], args: argparse.Namespace, **extra: Any) -> Any:
    """``model`` from ``--config`` (when given), then the flags, then ``extra`` on top."""
    return load_config(model, getattr(args, "config", None), **{**given(args), **extra})
