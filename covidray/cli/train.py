"""``covidray train`` and ``covidray evaluate``."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from ..evaluation.config import EvaluateConfig
from ..train.config import TrainConfig
from .flags import Command, config_from_args
from .render import console, epoch_printer, print_train_reports, render_text, train_epoch_line


def run_train(cfg: TrainConfig):
    """Train with an epoch line per epoch and the final reports."""
    from ..train.trainer import run_training

    result = run_training(cfg, on_epoch=epoch_printer(cfg.epochs, train_epoch_line))
    print_train_reports(result)
    return result


def cmd_train(args: argparse.Namespace) -> int:
    """Train on Ray Train; write <out>/model; print the test report and a JSON summary."""
    cfg = config_from_args(TrainConfig, args)
    console.rule(f"[bold]train {cfg.backbone} on {cfg.data} ({cfg.workers} worker(s))")
    result = run_train(cfg)
    console.rule(
        f"[bold green]model {result.model_version} (best epoch {result.best_epoch + 1}) in "
        f"{result.wall_s:.0f} s: {result.model_uri}"
    )
    print(result.model_dump_json(exclude={"history", "reports"}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a model directory on a dataset split; text tables or one JSON object."""
    from ..evaluation.evaluate import evaluate_model

    cfg = config_from_args(EvaluateConfig, args)
    report = evaluate_model(
        cfg.model, cfg.data, cfg.split, batch_size=cfg.batch_size, device=cfg.device
    )
    if args.format == "json":
        print(json.dumps(report.to_json()))
    else:
        Console().print(render_text(report, title=f"{cfg.model} on {cfg.data} ({cfg.split})"))
    return 0


COMMANDS = (
    Command(
        "train",
        TrainConfig,
        cmd_train,
        "train a classifier on Ray Train; writes <out>/model",
        {
            "main": "data out backbone weights epochs workers batch_size lr input_size seed "
            "augment_with run_name"
        },
    ),
    Command(
        "evaluate",
        EvaluateConfig,
        cmd_evaluate,
        "score a model directory on a dataset split",
        {"main": "model data split"},
        extra=(("--format", {"default": "text", "choices": ("text", "json")}),),
    ),
)
