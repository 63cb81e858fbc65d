"""``covidray submit COMMAND [options] -- ARGS`` and ``covidray jobs list|logs|stop``: covidray
commands as Ray jobs on a cluster (covidray.runtime.jobs does the talking)."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rich.markup import escape

from ..runtime.config import JobsConfig, SubmitConfig
from ..runtime.jobs import SUBMITTABLE
from .flags import Command, config_from_args
from .render import console, jobs_table

# Config fields that name data locations: a local path there is a path on the cluster's nodes.
LOCATIONS = ("src", "dest", "data", "out", "model", "augment_with", "scores", "links")


@dataclass(frozen=True)
class CommandGroup:
    """``covidray NAME SUB ...``: a command whose sub-commands are :class:`Command`\\ s."""

    name: str
    help: str
    commands: tuple[Command, ...]

    def register(
        self, sub: argparse._SubParsersAction, parents: Iterable[argparse.ArgumentParser]
    ) -> argparse.ArgumentParser:
        parser = sub.add_parser(self.name, help=self.help, description=self.help)
        inner = parser.add_subparsers(dest=f"{self.name}_command", required=True)
        for command in self.commands:
            command.register(inner, list(parents))
        return parser


def check_job_args(command: str, args: Sequence[str]) -> None:
    """Parse ``covidray COMMAND ARGS`` and build its config here, so that a typo fails before
    anything is submitted. A ``--config`` file that exists only on the cluster leaves the
    flags' syntax checked."""
    from .commands import job_models, job_parser

    try:
        ns = job_parser().parse_args([command, *args])
    except SystemExit as stop:
        if stop.code:
            raise ValueError(
                f"the arguments after -- are not those of `covidray {command}`: nothing submitted"
            ) from None
        raise  # --help
    model = job_models()[ns.func]
    config = getattr(ns, "config", None)
    if config and "://" not in config and not _readable(config):
        console.print("[yellow]--config is not readable here: only the flags were checked")
        return
    cfg = config_from_args(model, ns)
    for name in LOCATIONS:
        value = getattr(cfg, name, None)
        if isinstance(value, str) and "://" not in value:
            console.print(
                f"[yellow]warning:[/yellow] the {name.replace('_', ' ')} location is a local "
                "path: on the cluster it names a folder on the node that does the work"
            )


def _readable(path: str) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def cmd_submit(command: str, args: argparse.Namespace) -> int:
    """Submit ``covidray COMMAND ARGS``; follow it unless --no-wait; its exit status."""
    from ..runtime.jobs import Jobs, build_submission, describe

    cfg = config_from_args(SubmitConfig, args)
    job_args = list(args.job_args)
    check_job_args(command, job_args)
    submission = build_submission(cfg, command, job_args)
    jobs = Jobs(cfg)
    job_id = jobs.submit(submission)
    console.print(f"submitted {escape(describe(submission))}")
    if not cfg.wait:
        print(job_id)
        console.print(f"follow it with: covidray jobs logs {job_id} --follow")
        return 0
    outcome = jobs.follow(job_id, on_text=_write, on_status=_status_line)
    colour = "green" if outcome.exit_code == 0 else "red"
    console.print(
        f"[{colour}]job {job_id} {outcome.status} after {outcome.wall_s:.0f} s "
        f"(exit {outcome.exit_code})"
    )
    return outcome.exit_code


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _status_line(status: str, seconds: float) -> None:
    console.print(f"[bold]job {status}[/bold] ({seconds:.0f} s)")


def cmd_jobs_list(args: argparse.Namespace) -> int:
    """The cluster's jobs: id, status, covidray command, start, duration, exit code."""
    from ..runtime.jobs import Jobs, job_row

    jobs = Jobs(config_from_args(JobsConfig, args))
    rows = [job_row(j) for j in jobs.list()]
    console.print(jobs_table(rows))
    for row in rows:
        print(f"{row['id']}\t{row['status']}\t{row['command']}")
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    """A job's logs so far, or (--follow) until it ends."""
    from ..runtime.jobs import Jobs

    jobs = Jobs(config_from_args(JobsConfig, args))
    if not args.follow:
        _write(jobs.logs(args.job_id))
        return 0
    outcome = jobs.follow(args.job_id, on_text=_write, on_status=_status_line)
    console.print(f"job {args.job_id} {outcome.status} (exit {outcome.exit_code})")
    return outcome.exit_code


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    """Stop a job and wait until it is over."""
    from ..runtime.jobs import Jobs

    status = Jobs(config_from_args(JobsConfig, args)).stop(args.job_id)
    console.print(f"job {args.job_id}: {status}")
    return 0 if status in ("STOPPED", "SUCCEEDED", "FAILED") else 1


JOB_ID = ("job_id", {"metavar": "ID", "help": "the job's submission id"})


def _submit_command(name: str) -> Command:
    return Command(
        name,
        SubmitConfig,
        functools.partial(cmd_submit, name),
        f"run `covidray {name} ARGS` on the cluster",
        {"main": "address wait runtime_env working_dir s3_settings"},
        config=False,
        extra=(
            (
                "job_args",
                {
                    "nargs": "*",
                    "metavar": "-- ARGS",
                    "help": f"the arguments of `covidray {name}`, after --",
                },
            ),
        ),
    )


COMMANDS = (
    CommandGroup(
        "submit",
        "run a covidray command as a Ray job on a cluster (Ray's Jobs API); follows its logs "
        "and returns its exit status",
        tuple(_submit_command(name) for name in SUBMITTABLE),
    ),
    CommandGroup(
        "jobs",
        "the Ray jobs of a cluster: list, logs, stop",
        (
            Command("list", JobsConfig, cmd_jobs_list, "list the cluster's jobs", config=False),
            Command(
                "logs",
                JobsConfig,
                cmd_jobs_logs,
                "a job's logs",
                config=False,
                extra=(JOB_ID, ("--follow", {"action": "store_true", "help": "until it ends"})),
            ),
            Command("stop", JobsConfig, cmd_jobs_stop, "stop a job", config=False, extra=(JOB_ID,)),
        ),
    ),
)
