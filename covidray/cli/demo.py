"""``covidray demo``: the main job end to end on the embedded defaults (local Ray, local
storage): data (real X-rays, else phantoms) → ingest → a short training run → batch scoring →
the disease-progression report."""

from __future__ import annotations

import argparse
import os
import time

from ..config import DemoConfig, IngestConfig, SynthConfig
from ..manifest import CSV_NAME
from ..report.config import ReportConfig
from ..score.config import ScoreConfig
from ..train.config import TrainConfig
from .data import run_ingest, run_synth
from .flags import Command, config_from_args
from .render import console
from .score import run_report, run_score
from .train import run_train


def run_demo(cfg: DemoConfig) -> int:
    from .. import storage

    work = os.path.abspath(cfg.workdir)
    t0 = time.perf_counter()
    times: dict[str, float] = {}  # step -> seconds
    clock = {"step": "", "since": t0}

    def step(name: str, title: str) -> None:
        """Close the running step's clock; start ``name`` under a numbered rule."""
        now = time.perf_counter()
        if clock["step"]:
            times[clock["step"]] = now - clock["since"]
        clock.update(step=name, since=now)
        if title:
            console.rule(f"[bold]{len(times) + 1}. {title}")

    data = cfg.data
    if data and storage.exists(storage.join(data, CSV_NAME)):
        step("data", f"data: {data}")
    else:
        step("data", "data: synthetic phantoms")
        console.print(f"no real X-rays ({f'no {CSV_NAME} in {data}' if data else 'no --data'})")
        data = os.path.join(work, "phantoms")
        run_synth(SynthConfig(dest=data, n_per_class=cfg.phantoms_per_class))

    step("ingest", "ingest")
    dataset = os.path.join(work, "dataset")
    run_ingest(IngestConfig(src=data, dest=dataset))
    views = None
    if cfg.views and storage.exists(storage.join(cfg.views, CSV_NAME)):
        views = os.path.join(work, "views")  # unlabelled rows: the view check's films
        run_ingest(IngestConfig(src=cfg.views, dest=views))
    elif cfg.views:
        console.print(f"no {CSV_NAME} in {cfg.views}: no view check")

    train_cfg = TrainConfig(
        data=dataset,
        out=os.path.join(work, "train"),
        epochs=cfg.epochs,
        input_size=cfg.input_size,
        views=views,
    )
    tuned = TrainConfig.model_fields["epochs"].default
    step("train", f"train {train_cfg.backbone} ({train_cfg.weights} weights): SHORT DEMO RUN")
    console.print(
        f"[yellow]A short demo run: {train_cfg.epochs} epoch(s), not the tuned {tuned}. The "
        f"tuned recipe is `covidray train --data {dataset} --out <folder>` with its defaults."
    )
    trained = run_train(train_cfg)
    console.print(
        f"model {trained.model_version} (best epoch {trained.best_epoch + 1}): {trained.model_uri}"
    )

    step("score", "score the dataset (the nightly job)")
    scores = os.path.join(work, "scores")
    run_score(ScoreConfig(model=trained.model_uri, data=dataset, out=scores))

    step("report", "disease-progression report")
    report = os.path.join(work, "report.html")
    run_report(ReportConfig(scores=scores, out=report, data=dataset))

    step("", "")  # stops the last step's clock
    console.print(" · ".join(f"{k} {v:.0f} s" for k, v in times.items()), highlight=False)
    console.rule(f"[bold green]demo finished in {time.perf_counter() - t0:.0f} s")
    console.print(f"dataset: {dataset}")
    console.print(f"model:   {trained.model_uri}")
    console.print(f"scores:  {scores}")
    console.print(f"[bold]report:  {report}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(config_from_args(DemoConfig, args))


COMMANDS = (
    Command(
        "demo",
        DemoConfig,
        cmd_demo,
        "run the main job end to end on local defaults",
        {"main": "data views workdir phantoms_per_class epochs input_size"},
        config=False,
    ),
)
