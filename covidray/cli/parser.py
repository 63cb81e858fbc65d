"""The ``covidray`` argument parser: one module per command group, each with its COMMANDS."""

from __future__ import annotations

import argparse

from .. import __version__
from . import demo, jobs, serve
from .commands import JOB_GROUPS, add_groups, new_parser


def build_parser() -> argparse.ArgumentParser:
    parser, common = new_parser(
        "Chest X-ray scoring for COVID-19 and pneumonia at hospital scale. "
        "Each command's options are a pydantic config (covidray.config); --config loads them "
        "from YAML and flags override the file.",
        __version__,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    data, train, score, pacs = JOB_GROUPS
    add_groups(sub, (data, demo, train, score, pacs, serve, jobs), common)
    return parser
