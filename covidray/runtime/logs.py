"""Where a command's output goes: covidray's on the console, everything else in a log file.

By default (:func:`route_output` with ``verbose=False``) the console shows only what covidray
itself prints (step headers, progress bars, epoch lines, tables, its own warnings and errors).
The rest of what this process writes goes to a log file: Ray's and Ray Train's INFO lines,
checkpoint lines, the output of Ray's workers forwarded to the driver, the core worker's C++
messages, Python warnings, and covidray's INFO log records. The process's stderr (file
descriptor 2, which C++ code and Ray's own log handlers write to) is pointed at the log file;
the console keeps a handle on the terminal. Verbose leaves the streams alone: everything on
the console, as Ray prints it.

The command line decides where the file goes (:func:`default_log_path`) and prints its path;
:func:`covidray.runtime.cluster.ensure_ray` calls :func:`ray_started` once Ray is up.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TextIO

LOG_DIR_ENV = "COVIDRAY_LOG_DIR"
# Logger name prefixes whose records the quiet console shows (WARNING and above).
OWN_LOGGERS = ("covidray", "serving", "__main__")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class Routing:
    """The active routing of one command: the log file, the terminal stream the console
    writes to, and ``on_ray_start`` (called once, when Ray is up: the CLI prints the path)."""

    path: str
    terminal: TextIO
    verbose: bool
    on_ray_start: Callable[[], None] | None = None
    announced: bool = False
    handlers: list[logging.Handler] = field(default_factory=list)


_active: Routing | None = None


def default_log_path(command: str) -> str:
    """``$COVIDRAY_LOG_DIR`` (default: ``<tmp>/covidray-logs``) ``/<command>-<time>-<pid>.log``."""
    folder = os.environ.get(LOG_DIR_ENV) or os.path.join(tempfile.gettempdir(), "covidray-logs")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in command) or "covidray"
    return os.path.join(folder, f"{name}-{stamp}-{os.getpid()}.log")


class _Own(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith(OWN_LOGGERS)


def _terminal_stream() -> tuple[TextIO, bool]:
    """A stream to the terminal that survives pointing fd 2 elsewhere; ``(stream, owned)``.

    When ``sys.stderr`` is not fd 2 itself (a test's capture), it is left as it is."""
    try:
        is_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        is_fd2 = False
    if not is_fd2:
        return sys.stderr, False
    stream = os.fdopen(
        os.dup(2),
        "w",
        buffering=1,
        encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
        errors="backslashreplace",
    )
    return stream, True


@contextlib.contextmanager
def route_output(
    path: str, *, verbose: bool, on_ray_start: Callable[[], None] | None = None
) -> Iterator[Routing]:
    """Route this process's output for the duration of a command (see the module docstring).

    Yields the :class:`Routing`; its ``terminal`` is where the console must write. Log
    records: covidray's at INFO and up to the file; on the console covidray's WARNING and up
    (everything at INFO with ``verbose``)."""
    global _active
    root = logging.getLogger()
    old_level = root.level
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    env_before = os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS")
    saved_fd: int | None = None
    owned = False
    if verbose:
        terminal: TextIO = sys.stderr
        console = logging.StreamHandler(terminal)
        console.setLevel(logging.INFO)
        handlers: list[logging.Handler] = [console]
    else:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        terminal, owned = _terminal_stream()
        console = logging.StreamHandler(terminal)
        console.setLevel(logging.WARNING)
        console.addFilter(_Own())
        to_file = logging.FileHandler(path, encoding="utf-8")
        to_file.setLevel(logging.INFO)
        handlers = [console, to_file]
        # Ray Data's progress bars are Ray's: off (read when ray.data is first imported).
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        sys.stderr.flush()
        saved_fd = os.dup(2)
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log_fd, 2)
        os.close(log_fd)
    for h in handlers:
        h.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(h)
    routing = Routing(path, terminal, verbose, on_ray_start, handlers=handlers)
    _active = routing
    try:
        yield routing
    finally:
        _active = None
        for h in handlers:
            root.removeHandler(h)
            h.close()
        root.setLevel(old_level)
        if saved_fd is not None:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            if env_before is None:
                os.environ.pop("RAY_DATA_DISABLE_PROGRESS_BARS", None)
        if owned:
            terminal.flush()
            terminal.close()


def announce() -> None:
    """Call the routing's ``on_ray_start`` once (the CLI prints the log file's path)."""
    r = _active
    if r is not None and not r.announced:
        r.announced = True
        if r.on_ray_start is not None:
            r.on_ray_start()


def ray_started() -> None:
    """Ray is up in this process: when quiet, send the output of Ray's workers that the
    driver prints (their stdout included) to stderr, i.e. the log file; then announce."""
    r = _active
    if r is None:
        return
    if not r.verbose:
        _worker_output_to_stderr()
    announce()


def _worker_output_to_stderr() -> None:
    """Send what Ray prints on the driver's stdout (the terminal) to stderr, i.e. the log file:
    the output of Ray's workers forwarded to the driver (the dispatcher's ``ray_print_logs``
    handler) and the error messages Ray's listener prints as ``(raylet)`` lines (such as *Task
    ServeController.graceful_shutdown failed* when ``covidray serve`` stops). Ray private API:
    if it changes, those lines stay on stdout, nothing else breaks."""
    try:
        from ray._private import worker as ray_worker

        current = ray_worker.print_to_stdstream
        original = getattr(current, "__wrapped__", current)

        @functools.wraps(original)
        def to_stderr(data: dict, ignore_prefix: bool) -> None:
            original({**data, "is_err": True}, ignore_prefix=ignore_prefix)

        ray_worker.print_to_stdstream = to_stderr  # the error listener's printer
        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        if not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
            return  # log_to_driver=False: no worker output is forwarded
        ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler(
            "ray_print_logs", functools.partial(to_stderr, ignore_prefix=ignore_prefix)
        )
    except Exception:  # pragma: no cover - depends on Ray's internals
        logging.getLogger(__name__).debug("could not reroute Ray worker output", exc_info=True)
