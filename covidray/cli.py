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
    from .ingest import ingest

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
    with progress_bar("ingest") as update:
        result = ingest(cfg, progress=update)
    print_ingest_result(result)
    print(result.model_dump_json())
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import write_phantoms

    cfg = load_config(
        SynthConfig,
        args.config,
        dest=args.dest,
        n_per_class=args.n_per_class,
        seed=args.seed,
        size=args.size,
    )
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
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job end to end on the embedded defaults: local Ray, local storage."""
    from . import storage
    from .ingest import ingest
    from .synth import write_phantoms

    work = os.path.abspath(args.workdir)
    t0 = time.perf_counter()
    data = args.data
    if data and storage.exists(storage.join(data, "manifest.csv")):
        console.rule(f"[bold]1. data: {data}")
    else:
        data = os.path.join(work, "phantoms")
        console.rule(f"[bold]1. data: no real X-rays found, synthesizing phantoms in {data}")
        n = args.phantoms_per_class
        with progress_bar("synth") as update:
            write_phantoms(data, n, seed=0, progress=lambda k: update(k, 3 * n))
    console.rule("[bold]2. ingest")
    dataset = os.path.join(work, "dataset")
    with progress_bar("ingest") as update:
        result = ingest(IngestConfig(src=data, dest=dataset), progress=update)
    print_ingest_result(result)
    console.rule(f"[bold green]demo finished in {time.perf_counter() - t0:.0f} s")
    console.print(f"dataset: {dataset}")
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
