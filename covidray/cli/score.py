"""``covidray score`` (the nightly job) and ``covidray report``."""

from __future__ import annotations

import argparse

from ..report.config import ReportConfig
from ..score.config import ScoreConfig
from .flags import Command, config_from_args
from .render import console, score_table


def run_score(cfg: ScoreConfig):
    """Run the scoring job with its input plan and the summary table on the console."""
    from ..score.job import run_score as score

    def plan(kind: str, n_read: int, n_skipped: int) -> None:
        console.print(f"{kind} input: {n_read} to read, {n_skipped} already scored")

    result = score(cfg, on_plan=plan)
    console.print(score_table(result))
    return result


def run_report(cfg: ReportConfig):
    """Build the progression report and say where it went and what it holds."""
    from ..report.progression import build_report

    summary = build_report(cfg)
    console.print(
        f"report: {summary.out} ({summary.n_patients} patient(s) with several studies, "
        f"{summary.n_images} image(s), model {summary.model_version})"
    )
    return summary


def cmd_score(args: argparse.Namespace) -> int:
    """Nightly rescoring on Ray Data: predictions and Grad-CAM for images not yet scored."""
    cfg = config_from_args(ScoreConfig, args)
    console.rule(f"[bold]score {cfg.data} with {cfg.model}")
    print(run_score(cfg).model_dump_json())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Disease-progression report: one self-contained HTML file."""
    print(run_report(config_from_args(ReportConfig, args)).model_dump_json())
    return 0


COMMANDS = (
    Command(
        "score",
        ScoreConfig,
        cmd_score,
        "score new images on Ray Data (predictions + Grad-CAM)",
        {"main": "model data out overlays batch_size workers threads rows_per_file device"},
    ),
    Command(
        "report",
        ReportConfig,
        cmd_report,
        "HTML disease-progression report from predictions",
        {"main": "scores out data model_version"},
    ),
)
