"""``covidray train`` and ``covidray evaluate``."""

from __future__ import annotations

import argparse
import json

from ..config import CalibrateConfig
from ..evaluation.config import EvaluateConfig
from ..train.config import TrainConfig
from .flags import Command, config_from_args
from .render import (
    compare_text,
    console,
    epoch_printer,
    print_train_reports,
    render_text,
    stdout_console,
    train_epoch_line,
)


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


def require_device(device: str | None) -> None:
    """Refuse ``--device cuda`` up front when this process sees no CUDA GPU."""
    if device and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score one model directory (or several, side by side) on a dataset split; text tables or
    one JSON object."""
    from ..evaluation.evaluate import evaluate_model

    cfg = config_from_args(EvaluateConfig, args)
    require_device(cfg.device)
    reports = {
        uri: evaluate_model(uri, cfg.data, cfg.split, batch_size=cfg.batch_size, device=cfg.device)
        for uri in cfg.model
    }
    if args.format == "json":
        if len(reports) == 1:
            print(json.dumps(next(iter(reports.values())).to_json()))
        else:
            print(json.dumps({"models": {u: r.to_json() for u, r in reports.items()}}))
    elif len(reports) == 1:
        ((uri, report),) = reports.items()
        stdout_console().print(render_text(report, title=f"{uri} on {cfg.data} ({cfg.split})"))
    else:
        stdout_console().print(compare_text(reports, title=f"{cfg.data} ({cfg.split})"))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Fit calibration and gate on an existing model directory; print the val/test figures."""
    from ..posthoc import calibrate_model_dir

    cfg = config_from_args(CalibrateConfig, args)
    card, reports = calibrate_model_dir(
        cfg.model,
        cfg.data,
        cfg.out,
        device=cfg.device,
        batch_size=cfg.batch_size,
        gate_layers=tuple(cfg.gate_layer) or None,
        views_uri=cfg.views,
    )
    cal = card.effective_calibration
    console.print(
        f"calibration: {cal.method}, T = {cal.temperature:.3f} (fitted on {cal.fitted_on}); "
        f"gate over {', '.join(card.gate.feature_layers)}, threshold {card.gate.threshold:.2f}; "
        f"scoring version {card.scoring_version}"
    )
    if card.view_check is not None:
        v = card.view_check
        console.print(
            f"view check over {', '.join(v.feature_layers)} ({v.fitted_on}); cross-validated "
            "by patient: "
            + ", ".join(f"{k.replace('_', ' ')} {a}/{b}" for k, (a, b) in v.cv.items())
        )
    console.print(f"COVID-19 Grad-CAM scale {card.cam_covid_scale:.4g} (val 99th percentile)")
    for split, report in reports.items():
        out = report.outputs
        console.print(
            f"[bold]{split}[/bold]: ECE {out.ece_uncalibrated:.3f} → {report.ece:.3f}, labels "
            f"changed {out.labels_changed_by_calibration}, gate false rejections "
            f"{out.n_rejected}/{report.n}"
            + "".join(f", {k} {v}" for k, v in sorted(out.rejections_by_reason.items()))
        )
    print(json.dumps({"model": cfg.out or cfg.model, "scoring_version": card.scoring_version}))
    return 0


COMMANDS = (
    Command(
        "train",
        TrainConfig,
        cmd_train,
        "train a classifier on Ray Train; writes <out>/model",
        {
            "main": "data out backbone weights epochs workers batch_size lr input_size seed "
            "augment_with views run_name"
        },
    ),
    Command(
        "calibrate",
        CalibrateConfig,
        cmd_calibrate,
        "fit calibration and the input gate of a model directory on a dataset",
        {"main": "model data views out"},
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
