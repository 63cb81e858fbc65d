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


# The demo trains this many epochs: enough to see the loss fall and get a usable model, short
# enough that the whole demo fits in about ten minutes on two CPU cores.
DEMO_EPOCHS = 3


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job end to end on the embedded defaults: local Ray, local storage.

    data (real X-rays, else phantoms) → ingest → a short training run → batch scoring →
    the disease-progression report.
    """
    from . import storage
    from .report import ReportConfig
    from .score import ScoreConfig
    from .train import TrainConfig, run_training

    work = os.path.abspath(args.workdir)
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

    data = args.data
    if data and storage.exists(storage.join(data, "manifest.csv")):
        step("data", f"data: {data}")
    else:
        step("data", "data: synthetic phantoms")
        console.print(f"no real X-rays ({f'no manifest.csv in {data}' if data else 'no --data'})")
        data = os.path.join(work, "phantoms")
        run_synth(SynthConfig(dest=data, n_per_class=args.phantoms_per_class))

    step("ingest", "ingest")
    dataset = os.path.join(work, "dataset")
    run_ingest(IngestConfig(src=data, dest=dataset))

    train_cfg = load_config(
        TrainConfig,
        data=dataset,
        out=os.path.join(work, "train"),
        epochs=args.epochs,
        input_size=args.input_size,
    )
    tuned = TrainConfig.model_fields["epochs"].default
    step("train", f"train {train_cfg.backbone} ({train_cfg.weights} weights): SHORT DEMO RUN")
    console.print(
        f"[yellow]A short demo run: {train_cfg.epochs} epoch(s), not the tuned {tuned}. The "
        f"tuned recipe is `covidray train --data {dataset} --out <folder>` with its defaults."
    )
    trained = run_training(train_cfg)
    print_train_reports(trained)
    console.print(
        f"model {trained.model_version} (best epoch {trained.best_epoch + 1}): {trained.model_uri}"
    )

    step("score", "score the dataset (the nightly job)")
    scores = os.path.join(work, "scores")
    score_and_print(ScoreConfig(model=trained.model_uri, data=dataset, out=scores))

    step("report", "disease-progression report")
    report = os.path.join(work, "report.html")
    report_and_print(ReportConfig(scores=scores, out=report, data=dataset))

    step("", "")  # stops the last step's clock
    console.print(" · ".join(f"{k} {v:.0f} s" for k, v in times.items()), highlight=False)
    console.rule(f"[bold green]demo finished in {time.perf_counter() - t0:.0f} s")
    console.print(f"dataset: {dataset}")
    console.print(f"model:   {trained.model_uri}")
    console.print(f"scores:  {scores}")
    console.print(f"[bold]report:  {report}")
    return 0


def print_train_reports(result) -> None:
    """One line per evaluated split of a TrainResult: accuracy, macro-F1, COVID recall, adult."""
    for split, m in result.reports.items():
        adult = f" · adult accuracy {m['adult']['accuracy']:.3f}" if m.get("adult") else ""
        console.print(
            f"[bold]{split}[/bold]: accuracy {m['accuracy']:.3f} · macro-F1 "
            f"{m['macro_f1']:.3f} · COVID recall {m['covid_recall']:.3f}{adult}"
        )


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
    print_train_reports(result)
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


def cmd_score(args: argparse.Namespace) -> int:
    """Nightly rescoring on Ray Data: predictions and Grad-CAM for images not yet scored."""
    from .score import ScoreConfig

    cfg = load_config(
        ScoreConfig,
        args.config,
        model=args.model,
        data=args.data,
        out=args.out,
        overlays=args.overlays,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        rows_per_file=args.rows_per_file,
        device=args.device,
    )

    console.rule(f"[bold]score {cfg.data} with {cfg.model}")
    result = score_and_print(cfg)
    print(result.model_dump_json())
    return 0


def score_and_print(cfg):
    """Run the scoring job with its input plan and the summary table on the console."""
    from .score import run_score
    from .score.pipeline import summary_table as score_table

    def plan(kind: str, n_read: int, n_skipped: int) -> None:
        console.print(f"{kind} input: {n_read} to read, {n_skipped} already scored")

    result = run_score(cfg, on_plan=plan)
    console.print(score_table(result))
    return result


def cmd_report(args: argparse.Namespace) -> int:
    """Disease-progression report: one self-contained HTML file."""
    from .report import ReportConfig

    cfg = load_config(
        ReportConfig,
        args.config,
        scores=args.scores,
        out=args.out,
        data=args.data,
        model_version=args.model_version,
    )
    summary = report_and_print(cfg)
    print(summary.model_dump_json())
    return 0


def report_and_print(cfg):
    """Build the progression report and say where it went and what it holds."""
    from .report import build_report

    summary = build_report(cfg)
    console.print(
        f"report: {summary.out} ({summary.n_patients} patient(s) with several studies, "
        f"{summary.n_images} image(s), model {summary.model_version})"
    )
    return summary


def _gan_filter(args: argparse.Namespace) -> dict | None:
    """A domain filter from --source/--age-group/--view (both domains), or None when unset."""
    given = {k: getattr(args, k) for k in ("source", "age_group", "view")}
    if all(v is None for v in given.values()):
        return None
    return {k: v for k, v in given.items() if v is not None}


def cmd_gan_train(args: argparse.Namespace) -> int:
    """Train the CycleGAN on Ray Train; write <out>/generator.* and <out>/samples/."""
    from .gan.config import GanConfig
    from .gan.train import run_gan_training

    flt = _gan_filter(args)
    cfg = load_config(
        GanConfig,
        args.config,
        data=args.data,
        out=args.out,
        domain_a=args.domain_a,
        domain_b=args.domain_b,
        filter_a=flt,
        filter_b=flt,
        size=args.size,
        ngf=args.ngf,
        n_blocks=args.n_blocks,
        epochs=args.epochs,
        iterations=args.iterations,
        workers=args.workers,
        batch_size=args.batch_size,
        torch_threads=args.threads,
        log_every=args.log_every,
        run_name=args.run_name,
        seed=args.seed,
    )
    console.rule(
        f"[bold]CycleGAN {cfg.domain_a} → {cfg.domain_b} on {cfg.data} at {cfg.size} px "
        f"({cfg.workers} worker(s))"
    )
    result = run_gan_training(cfg)
    console.rule(
        f"[bold green]generator {result.generator_version}: {result.total_steps} steps, "
        f"{result.s_per_iter:.2f} s/iter, {result.wall_s:.0f} s: {result.generator_uri}"
    )
    print(result.model_dump_json(exclude={"history"}))
    return 0


def cmd_gan_generate(args: argparse.Namespace) -> int:
    """Translate TRAIN-split domain-A images into a synthetic dataset at --out."""
    from .gan.config import GenerateConfig
    from .gan.generate import generate

    cfg = load_config(
        GenerateConfig,
        args.config,
        model=args.model,
        data=args.data,
        out=args.out,
        n=args.n,
        filter=_gan_filter(args),
        device=args.device,
        seed=args.seed,
    )
    with progress_bar("generate") as update:
        result = generate(cfg, progress=update)
    console.print(
        f"wrote {result.n_images} synthetic {result.label} images from {result.n_sources} "
        f"sources (generator {result.generator_version}): {result.manifest_uri}"
    )
    print(result.model_dump_json())
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
    p.add_argument(
        "--epochs",
        type=int,
        default=DEMO_EPOCHS,
        help=f"training epochs of the short demo run (default {DEMO_EPOCHS}; "
        "`covidray train` defaults to the tuned recipe)",
    )
    p.add_argument(
        "--input-size", type=int, dest="input_size", default=224, help="default 224 (short run)"
    )
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

    p = sub.add_parser("score", help="score new images on Ray Data (predictions + Grad-CAM)")
    p.add_argument("--model", help="model directory (local or s3://)")
    p.add_argument("--data", help="dataset (manifest.parquet or its folder) or image prefix")
    p.add_argument("--out", help="output folder: predictions/run_date=.../*.parquet")
    p.add_argument("--overlays", action="store_true", default=None, help="write overlay PNGs")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="images per model call")
    p.add_argument(
        "--workers", type=int, help="scoring actors (default: one per free GPU, else one)"
    )
    p.add_argument("--threads", type=int, help="torch threads per actor (default: cores / workers)")
    p.add_argument("--rows-per-file", type=int, dest="rows_per_file")
    p.add_argument("--device", help="cuda or cpu (default: cuda when the cluster has GPUs)")
    p.add_argument("--config", help="YAML file with ScoreConfig fields")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("report", help="HTML disease-progression report from predictions")
    p.add_argument("--scores", help="score output folder (or its predictions/)")
    p.add_argument("--out", help="report.html (local or s3://)")
    p.add_argument("--data", help="dataset for images and study metadata (optional)")
    p.add_argument("--model-version", dest="model_version", help="default: the latest scored")
    p.add_argument("--config", help="YAML file with ReportConfig fields")
    p.set_defaults(func=cmd_report)
    gan = sub.add_parser("gan", help="CycleGAN augmentation: train a generator, generate images")
    gan_sub = gan.add_subparsers(dest="gan_command", required=True)

    def gan_filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--source", help="comma-separated sources (default: any)")
        p.add_argument(
            "--age-group", dest="age_group", help='comma-separated (default "adult"; "any")'
        )
        p.add_argument("--view", help="comma-separated views, e.g. PA,AP (default: any)")
        p.add_argument("--seed", type=int)
        p.add_argument("--config", help="YAML file with the command's config fields")

    p = gan_sub.add_parser("train", help="train a CycleGAN on Ray Train (TRAIN split only)")
    p.add_argument("--data", help="dataset folder or manifest.parquet (local or s3://)")
    p.add_argument("--from", dest="domain_a", help="domain A label (default normal)")
    p.add_argument("--to", dest="domain_b", help="domain B label (default covid)")
    p.add_argument("--out", help="output folder: generator.*, samples/, ray/")
    p.add_argument("--size", type=int, help="square resolution (default 128; 256 on GPU)")
    p.add_argument("--ngf", type=int, help="generator base width (default 32)")
    p.add_argument("--n-blocks", type=int, dest="n_blocks", help="residual blocks (default 6)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--iterations", type=int, help="total steps (default: an epoch = max(|A|,|B|))")
    p.add_argument("--workers", type=int, help="Ray Train workers (default 1)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="per worker (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per worker")
    p.add_argument("--log-every", type=int, dest="log_every", help="progress line every N steps")
    p.add_argument("--run-name", dest="run_name", help="reuse a name to resume that run")
    gan_filters(p)
    p.set_defaults(func=cmd_gan_train)

    p = gan_sub.add_parser("generate", help="translate TRAIN-split normals into a dataset")
    p.add_argument("--model", help="folder with generator.safetensors and generator.json")
    p.add_argument("--data", help="dataset folder or manifest.parquet")
    p.add_argument("--n", type=int, help="images to write (default 100)")
    p.add_argument("--out", help="output dataset folder (manifest.parquet, images/)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    gan_filters(p)
    p.set_defaults(func=cmd_gan_generate)
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
