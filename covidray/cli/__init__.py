"""The ``covidray`` command line: ``parser`` assembles one module per command group (``data``,
``demo``, ``train``, ``score``, ``gan``); ``flags`` derives each command's flags from its
pydantic config; ``render`` holds everything the console shows."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from .parser import build_parser
from .render import console

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
