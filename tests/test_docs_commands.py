"""Every ``covidray …`` command line the README and docs/ show is one the real parser accepts.

Command lines are taken from fenced code blocks (continuation backslashes joined, ``# …``
comments dropped, ``&&``/``;``/``|`` chains split) and from inline code spans that start with
``covidray``. Each is parsed by :func:`covidray.cli.parser.build_parser` (parsing only: no job
runs); for ``covidray submit CMD -- ARGS`` the arguments after ``--`` are parsed as ``covidray
CMD ARGS`` too. An inline span that names a command without arguments (``covidray score``) must
name one that exists. Lines written as synopses (brackets, braces, alternatives) are refused
unless they are listed in :data:`SYNOPSES`. Pages other issues add to docs/ are covered by the
glob; a page that is not there is simply not read.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from covidray.cli.commands import job_parser
from covidray.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[1]
# Synopsis lines kept on purpose (brackets for optional parts): none today. Add one here, as
# it appears in the page after joining continuation lines, to keep it.
SYNOPSES: frozenset[str] = frozenset()
_FENCE = re.compile(r"^```.*?$(.*?)^```", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"`(covidray [^`]+)`")
_SYNOPSIS = re.compile(r"\[|\]|\{|\}|…|\.\.\.|\bA\|B\b|[A-Za-z]\|[a-z]")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands_in_block(block: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", block)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote: not a shell line
            continue
        segment: list[str] = []
        for token in [*tokens, "&&"]:
            if token in ("&&", "||", ";", "|", "&"):
                if segment and segment[0] == "covidray":
                    found.append(shlex.join(segment))
                segment = []
            else:
                segment.append(token)
    return found


def command_lines(text: str) -> list[tuple[str, bool]]:
    """``(command line, inline)`` for every covidray command in a page's markdown."""
    lines = [(c, False) for block in _FENCE.findall(text) for c in _commands_in_block(block)]
    outside = _FENCE.sub("", text)
    for span in _INLINE.finditer(outside):
        lines += [(c, True) for c in _commands_in_block(span.group(1).replace("\n", " "))]
    return lines


def parse(line: str) -> None:
    """Parse ``line`` as the CLI would; raise AssertionError with argparse's message if not."""
    argv = shlex.split(line)[1:]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            ns = build_parser().parse_args(argv)
            if ns.command == "submit":
                job_parser().parse_args([ns.submit_command, *ns.job_args])
        except SystemExit as stop:
            if stop.code == 0 and "--help" in argv:  # `covidray score --help`: fine
                return
            raise AssertionError(f"{line!r}: {err.getvalue().strip()}") from stop


def _is_bare_command(line: str) -> bool:
    """``covidray score``, ``covidray gan train``: a command's name, no arguments."""
    words = line.split()[1:]
    return all(re.fullmatch(r"[a-z]+", w) for w in words) and len(words) <= 2


def _command_exists(line: str) -> bool:
    words = line.split()[1:]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args([*words, "--help"])
        except SystemExit as stop:
            return stop.code == 0
    return False


def test_the_pages_show_command_lines() -> None:
    """The extraction finds the README's commands (the test below cannot pass vacuously)."""
    found = command_lines((ROOT / "README.md").read_text())
    assert sum(not inline for _, inline in found) >= 5


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_line_parses(page: Path) -> None:
    failures = []
    for line, inline in command_lines(page.read_text()):
        if line in SYNOPSES:
            continue
        if _SYNOPSIS.search(line):
            failures.append(f"synopsis, not a command line (or list it in SYNOPSES): {line}")
            continue
        if inline and _is_bare_command(line):
            if not _command_exists(line):
                failures.append(f"no such command: {line}")
            continue
        try:
            parse(line)
        except AssertionError as err:
            failures.append(str(err))
    assert not failures, "\n".join(failures)


def test_a_bad_command_line_is_caught() -> None:
    with pytest.raises(AssertionError, match="--no-such-flag"):
        parse("covidray score --model m --data d --out o --no-such-flag")
    with pytest.raises(AssertionError):  # the job's own arguments are parsed too
        parse("covidray submit train -- --data d --out o --epochs many")
    text = "```bash\ncovidray train --data d \\\n  --out o  # a comment\nmake demo && covidray"
    text += " synth /tmp/x --n-per-class 2\n```\nrun `covidray report --scores s --out r.html`."
    assert command_lines(text) == [
        ("covidray train --data d --out o", False),
        ("covidray synth /tmp/x --n-per-class 2", False),
        ("covidray report --scores s --out r.html", True),
    ]
    assert _SYNOPSIS.search("covidray ingest SRC DEST [--size 256]")
