"""The ``covidray`` command line: ``parser`` assembles one module per command group (``data``,
``demo``, ``train``, ``score``, ``gan``); ``flags`` derives each command's flags from its
pydantic config; ``render`` holds everything the console shows."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence

from rich.markup import escape

from ..runtime.cluster import LOOPBACK_ENV
from ..runtime.logs import default_log_path, route_output
from .errors import exit_code, expected, one_line, root_cause
from .parser import build_parser
from .render import console, width_for

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. The console shows covidray's output only; Ray's and the rest go to a
    log file whose path is printed (``-v``: everything on the console). A failure is one line
    and a non-zero exit status; its traceback goes to the log file."""
    if not os.environ.get("RAY_ADDRESS"):  # a local Ray, if one starts, on 127.0.0.1 only
        for key, value in LOOPBACK_ENV.items():
            os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    name = "-".join(str(getattr(args, a)) for a in ("command", "gan_command") if hasattr(args, a))
    path = default_log_path(name)

    def show_path() -> None:
        text = f"[dim]log file (Ray and more): {escape(path)}[/dim]"
        console.print(text, highlight=False, soft_wrap=True)

    with route_output(path, verbose=args.verbose, on_ray_start=show_path) as routing:
        previous = getattr(console, "_file", None)
        console.file = routing.terminal
        console.width = width_for(routing.terminal)  # type: ignore[assignment]  # None: auto
        try:
            code = args.func(args)
        except (Exception, KeyboardInterrupt) as err:
            cause = root_cause(err)
            if args.verbose and not expected(cause):
                traceback.print_exception(err, file=sys.stderr)
            elif not args.verbose:
                _log_traceback(path, err)
            where = "" if args.verbose or expected(cause) else f" (traceback: {path})"
            text = "interrupted" if isinstance(cause, KeyboardInterrupt) else one_line(cause)
            line = f"[red]error:[/red] {escape(text)}{escape(where)}"
            console.print(line, highlight=False, soft_wrap=True)  # one line, however long
            code = exit_code(cause)
        finally:
            if not args.verbose and not routing.announced and _has_content(path):
                show_path()
            console.file = previous
            console.width = None  # type: ignore[assignment]  # back to rich's own choice
    if not args.verbose and not _has_content(path):
        _remove(path)
    return code


def _log_traceback(path: str, err: BaseException) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            traceback.print_exception(err, file=f)
    except OSError:
        pass


def _has_content(path: str) -> bool:
    try:
        sys.stderr.flush()
        return os.path.getsize(path) > 0
    except OSError:
        return False


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
