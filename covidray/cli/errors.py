"""What a failed command says: one line, never a traceback (that goes to the log file).

Expected failures (bad options, a missing or corrupted model or weights file, an unknown
layout, a held lock, missing files, an interrupt) exit with 2 (130 for Ctrl-C) and their own
message; anything else exits with 1 and names the exception's type.
"""

from __future__ import annotations

import sys

from pydantic import ValidationError

# Error types that mean "the input or the options are wrong" and carry a message for users.
# Those of modules that import torch are looked up only when their module is loaded: an error
# of a module that was never imported cannot have been raised.
EXPECTED_BUILTIN: tuple[type[BaseException], ...] = (
    ValueError,  # bad options and inputs (pydantic's ValidationError, LayoutError, LockHeld...)
    FileNotFoundError,
    PermissionError,
)
EXPECTED_LAZY = (
    ("covidray.modeldir", "ModelLoadError"),
    ("covidray.models.weights", "WeightsError"),
)
MAX_CHARS = 500


def expected(err: BaseException) -> bool:
    """Whether ``err`` is a failure users cause and its message explains."""
    kinds = list(EXPECTED_BUILTIN)
    for module, name in EXPECTED_LAZY:
        loaded = sys.modules.get(module)
        if loaded is not None and hasattr(loaded, name):
            kinds.append(getattr(loaded, name))
    return isinstance(err, tuple(kinds))


def root_cause(err: BaseException) -> BaseException:
    """The exception a Ray wrapper carries (a task's ``cause``, Ray Train's first failed
    worker or its controller's failure), else ``err``."""
    seen = {id(err)}
    while True:
        failures = getattr(err, "worker_failures", None)
        inner = getattr(err, "cause", None) or getattr(err, "controller_failure", None)
        if isinstance(failures, dict) and failures:
            inner = failures[min(failures)]
        if not isinstance(inner, BaseException) or id(inner) in seen:
            return err
        seen.add(id(inner))
        err = inner


def _validation_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e.get("loc", ()))
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "invalid options: " + "; ".join(parts)


def one_line(err: BaseException) -> str:
    """The error as one line of at most :data:`MAX_CHARS` characters."""
    if isinstance(err, ValidationError):
        text = _validation_line(err)
    else:
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        text = lines[0] if lines else type(err).__name__
        if lines and not expected(err):
            text = f"{type(err).__name__}: {text}"
    text = " ".join(text.split())
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 1] + "…"


def exit_code(err: BaseException) -> int:
    if isinstance(err, KeyboardInterrupt):
        return 130
    return 2 if expected(err) else 1
