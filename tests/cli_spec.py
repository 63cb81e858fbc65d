"""Every command's flags as short specs (``"--size": "int"``), for the flag snapshot test."""

from __future__ import annotations

import argparse


def action_spec(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "switch"
    spec = getattr(action.type, "__name__", None) or "str"
    if action.nargs is not None:
        spec += f" nargs={action.nargs}"
    if action.choices:
        spec += " choices=" + ",".join(map(str, action.choices))
    return spec


def parser_specs(parser: argparse.ArgumentParser, path: str = "covidray") -> dict[str, dict]:
    """``{"covidray ingest": {"src": "str", "--size": "int", ...}, ...}``."""
    out: dict[str, dict] = {}
    flags: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(parser_specs(sub, f"{path} {name}"))
        elif not isinstance(action, argparse._HelpAction):
            names = action.option_strings or [action.metavar or action.dest]
            flags.update({n: action_spec(action) for n in names})
    if flags:
        out[path] = flags
    return out
