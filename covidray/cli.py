"""The ``covidray`` command line. Each command's options are a pydantic config (see config.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .config import IngestConfig, SplitConfig, SynthConfig, load_config
from .labels import CLASSES
from .manifest import SPLITS

console = Console(stderr=True)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar; yields ``update(done, total)``."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def summary_table(result) -> Table:
    table = Table(title=f"{result.n_rows} images ingested ({result.layout} layout)")
    table.add_column("class")
    unsplit = any("none" in per for per in result.counts.values())
    columns = (*SPLITS, "none") if unsplit else SPLITS
    for split in columns:
        table.add_column("not split" if split == "none" else split, justify="right")
    table.add_column("total", justify="right")
    labels = [c for c in CLASSES if c in result.counts]
    labels += sorted(c for c in result.counts if c not in CLASSES)
    for label in labels:
        per = result.counts[label]
        table.add_row(label, *[str(per.get(s, 0)) for s in columns], str(sum(per.values())))
    totals = [sum(result.counts[label].get(s, 0) for label in labels) for s in columns]
    table.add_row("[bold]total", *[str(t) for t in totals], str(sum(totals)))
    return table


def print_ingest_result(result) -> None:
    console.print(summary_table(result))
    if result.error_reasons:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(result.error_reasons.items()))
        console.print(f"not ingested: {reasons} (see {result.errors_uri})")
    if result.n_duplicates:
        console.print(f"dropped {result.n_duplicates} exact duplicate file(s)")
    console.print(f"manifest: {result.manifest_uri}")


def cmd_ingest(args: argparse.Namespace) -> int:

    split = None
    if args.seed is not None or args.fractions is not None:
        split = SplitConfig(
            seed=args.seed if args.seed is not None else 0,
            fractions=tuple(args.fractions) if args.fractions else SplitConfig().fractions,
        )
    cfg = load_config(
        IngestConfig,
        args.config,
        src=args.src,
        dest=args.dest,
        size=args.size,
        layout=args.layout,
        labels=args.labels,
        split=split,
    )
    result = run_ingest(cfg)
    print(result.model_dump_json())
    return 0


def run_ingest(cfg: IngestConfig):
    """Ingest with a progress bar and the summary table."""
    from .ingest import ingest

    with progress_bar("ingest") as update:
        result = ingest(cfg, progress=update)
    print_ingest_result(result)
    return result


def run_synth(cfg: SynthConfig) -> str:
    """Write phantoms with a progress bar; returns the manifest.csv URI."""
    from .synth import write_phantoms

    total = cfg.n_per_class * len(CLASSES)
    with progress_bar("synth") as update:
        manifest = write_phantoms(
            cfg.dest,
            cfg.n_per_class,
            seed=cfg.seed,
            size=cfg.size,
            progress=lambda k: update(k, total),
        )
    console.print(f"wrote {total} phantoms: {manifest}")
    return manifest


def cmd_synth(args: argparse.Namespace) -> int:
    overrides = dict(n_per_class=args.n_per_class, seed=args.seed, size=args.size)
    run_synth(load_config(SynthConfig, args.config, dest=args.dest, **overrides))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job end to end on the embedded defaults: local Ray, local storage."""
    from . import storage

    work = os.path.abspath(args.workdir)
    t0 = time.perf_counter()
    data = args.data
    if data and storage.exists(storage.join(data, "manifest.csv")):
        console.rule(f"[bold]1. data: {data}")
    else:
        data = os.path.join(work, "phantoms")
        console.rule(f"[bold]1. data: no real X-rays found, synthesizing phantoms in {data}")
        run_synth(SynthConfig(dest=data, n_per_class=args.phantoms_per_class))
    console.rule("[bold]2. ingest")
    dataset = os.path.join(work, "dataset")
    run_ingest(IngestConfig(src=data, dest=dataset))
    console.rule(f"[bold green]demo finished in {time.perf_counter() - t0:.0f} s")
    console.print(f"dataset: {dataset}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train on Ray Train; write <out>/model; print the test report and a JSON summary."""
    from .train import TrainConfig, run_training

    cfg = load_config(
        TrainConfig,
        args.config,
        data=args.data,
        out=args.out,
        backbone=args.backbone,
        weights=args.weights,
        epochs=args.epochs,
        workers=args.workers,
        batch_size=args.batch_size,
        lr=args.lr,
        input_size=args.input_size,
        seed=args.seed,
        augment_with=args.augment_with,
        run_name=args.run_name,
    )
    console.rule(f"[bold]train {cfg.backbone} on {cfg.data} ({cfg.workers} worker(s))")
    result = run_training(cfg)
    for split, m in result.reports.items():
        adult = f" · adult accuracy {m['adult']['accuracy']:.3f}" if m.get("adult") else ""
        console.print(
            f"[bold]{split}[/bold]: accuracy {m['accuracy']:.3f} · macro-F1 "
            f"{m['macro_f1']:.3f} · COVID recall {m['covid_recall']:.3f}{adult}"
        )
    console.rule(
        f"[bold green]model {result.model_version} (best epoch {result.best_epoch + 1}) in "
        f"{result.wall_s:.0f} s: {result.model_uri}"
    )
    print(result.model_dump_json(exclude={"history", "reports"}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a model directory on a dataset split; text tables or one JSON object."""
    import json

    from .evaluation import render_text
    from .modeldir import ModelLoadError
    from .train.evaluate import evaluate_model

    try:
        report = evaluate_model(args.model, args.data, args.split)
    except ModelLoadError as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    if args.format == "json":
        print(json.dumps(report.to_json()))
    else:
        Console().print(render_text(report, title=f"{args.model} on {args.data} ({args.split})"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covidray", description=__doc__)
    parser.add_argument("--version", action="version", version=f"covidray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="normalize an X-ray folder (local or s3://) into a dataset")
    p.add_argument(
        "src", help="source folder: class folders, manifest.csv, ieee8023, Kaggle or DICOM"
    )
    p.add_argument("dest", help="output folder (local or s3://bucket/prefix)")
    p.add_argument("--size", type=int, help="shorter side of stored PNGs (default 256)")
    p.add_argument(
        "--layout", help="force a layout: class-folders, manifest, ieee8023, kaggle, dicom"
    )
    p.add_argument("--labels", help="CSV with file,label columns (DICOM folders)")
    p.add_argument("--seed", type=int, help="split seed (default 0)")
    p.add_argument("--fractions", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--config", help="YAML file with IngestConfig fields")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("synth", help="write synthetic chest X-ray phantoms with lesion masks")
    p.add_argument("dest")
    p.add_argument("--n-per-class", type=int, dest="n_per_class")
    p.add_argument("--seed", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--config", help="YAML file with SynthConfig fields")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("demo", help="run the main job end to end on local defaults")
    p.add_argument("--data", help="real data folder (manifest.csv layout); phantoms when absent")
    p.add_argument("--workdir", default="demo-output")
    p.add_argument("--phantoms-per-class", type=int, default=60)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a classifier on Ray Train; writes <out>/model")
    p.add_argument("--data", help="dataset folder or manifest.parquet (local or s3://)")
    p.add_argument("--out", help="output folder (local or s3://): model/ and ray/ checkpoints")
    p.add_argument("--backbone", help="efficientnet_lite0 (default), efficientnet_b0, ...")
    p.add_argument("--weights", help='"imagenet" (default), a path/URI, or "none"')
    p.add_argument("--epochs", type=int)
    p.add_argument("--workers", type=int, help="Ray Train workers (default 1)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="per worker")
    p.add_argument("--lr", type=float)
    p.add_argument("--input-size", type=int, dest="input_size")
    p.add_argument("--seed", type=int)
    p.add_argument("--augment-with", dest="augment_with", help="extra rows for TRAIN only")
    p.add_argument("--run-name", dest="run_name", help="reuse a name to resume that run")
    p.add_argument("--config", help="YAML file with TrainConfig fields")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a model directory on a dataset split")
    p.add_argument("--model", required=True, help="model directory (local or s3://)")
    p.add_argument("--data", required=True, help="dataset folder or manifest.parquet")
    p.add_argument("--split", default="test", choices=("test", "val", "train", "all"))
    p.add_argument("--format", default="text", choices=("text", "json"))
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
