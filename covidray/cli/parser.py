"""The ``covidray`` argument parser: one module per command group, each with its COMMANDS."""

from __future__ import annotations

import argparse

from .. import __version__
from . import data, demo, gan, jobs, pacs, score, serve, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidray",
        description="Chest X-ray scoring for COVID-19 and pneumonia at hospital scale. "
        "Each command's options are a pydantic config (covidray.config); --config loads them "
        "from YAML and flags override the file.",
    )
    parser.add_argument("--version", action="version", version=f"covidray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    # -v after the command too; SUPPRESS keeps the sub-command from resetting a leading -v.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO level"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (data, demo, train, score, pacs, serve, jobs):
        for command in group.COMMANDS:
            command.register(sub, [common])
    gan_sub = sub.add_parser("gan", help=gan.GROUP_HELP).add_subparsers(
        dest="gan_command", required=True
    )
    for command in gan.COMMANDS:
        command.register(gan_sub, [common])
    return parser
