"""``covidray serve``: the HTTP endpoint on a local Ray (the ``serving`` package)."""

from __future__ import annotations

import argparse

from serving.config import ServingConfig

from .flags import PREFIX, Command, config_from_args
from .render import console

REPLICAS = PREFIX + "min_replicas|max_replicas"  # where --replicas N lands


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.local import run_local

    extra = {}
    if args.autoscale:
        if REPLICAS in vars(args):
            raise ValueError("give --replicas or --autoscale MIN MAX, not both")
        extra = {"min_replicas": args.autoscale[0], "max_replicas": args.autoscale[1]}
    cfg = config_from_args(ServingConfig, args, **extra)

    def ready(url: str) -> None:
        console.print(
            f"[bold green]covidray endpoint ready:[/bold green] {url}  (docs: {url}/docs)"
        )
        console.print(
            "try: curl -X POST -H 'Content-Type: image/png' --data-binary @film.png "
            f"{url}/v1/predict"
        )
        console.print("Ctrl-C stops it.")

    console.rule(f"[bold]serve {cfg.model}")
    run_local(cfg, args.host, args.port, on_ready=ready)
    console.print("stopped")
    return 0


COMMANDS = (
    Command(
        "serve",
        ServingConfig,
        cmd_serve,
        "run the HTTP endpoint (Ray Serve) on a local Ray until Ctrl-C",
        {
            "main": "model max_batch_size num_gpus",
            "aliases": {"--replicas": ("min_replicas", "max_replicas")},
            "helps": {"replicas": "a fixed number of model replicas (no autoscaling)"},
        },
        extra=(
            ("--host", {"default": "127.0.0.1", "help": "address to listen on"}),
            ("--port", {"type": int, "default": 8000, "help": "HTTP port"}),
            (
                "--autoscale",
                {"nargs": 2, "type": int, "metavar": ("MIN", "MAX"), "help": "model replicas"},
            ),
        ),
    ),
)
