"""The command groups and how they join a parser: the full ``covidray`` parser
(:mod:`covidray.cli.parser`) and the smaller one that checks a job's arguments before
``covidray submit`` sends them (:func:`job_parser`), which holds no ``submit`` itself."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from types import ModuleType

from pydantic import BaseModel

from . import data, gan, pacs, score, train

JOB_GROUPS = (data, train, score, pacs)  # and gan's sub-commands: what a cluster job may run


def new_parser(
    description: str | None = None, version: str | None = None
) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """``covidray``'s top-level parser and the parent every sub-command takes (``-v``)."""
    parser = argparse.ArgumentParser(prog="covidray", description=description)
    if version:
        parser.add_argument("--version", action="version", version=f"covidray {version}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    # -v after the command too; SUPPRESS keeps the sub-command from resetting a leading -v.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO level"
    )
    return parser, common


def add_groups(
    sub: argparse._SubParsersAction,
    groups: Iterable[ModuleType],
    common: argparse.ArgumentParser,
) -> None:
    """Register every command of ``groups``, then ``covidray gan …``."""
    for group in groups:
        for command in group.COMMANDS:
            command.register(sub, [common])
    gan_sub = sub.add_parser("gan", help=gan.GROUP_HELP).add_subparsers(
        dest="gan_command", required=True
    )
    for command in gan.COMMANDS:
        command.register(gan_sub, [common])


def job_parser() -> argparse.ArgumentParser:
    """A parser of the commands ``covidray submit`` may send (``ingest``, ``train``, …)."""
    parser, common = new_parser()
    add_groups(parser.add_subparsers(dest="command", required=True), JOB_GROUPS, common)
    return parser


def job_models() -> dict[object, type[BaseModel]]:
    """Each job command's handler → its options model."""
    groups = (*JOB_GROUPS, gan)
    return {c.func: c.model for group in groups for c in group.COMMANDS}
