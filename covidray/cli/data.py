"""``covidray ingest`` and ``covidray synth``: datasets in, phantoms out."""

from __future__ import annotations

import argparse

from ..config import IngestConfig, SynthConfig
from ..labels import CLASSES
from .flags import Command, config_from_args
from .render import console, print_ingest_result, progress_bar


def run_ingest(cfg: IngestConfig):
    """Ingest (a folder or bucket, or incrementally from a DICOMweb archive) with a progress bar
    and the summary table."""
    from ..pacs.fields import is_dicomweb

    if is_dicomweb(cfg.src):
        from ..pacs.pull import pull as ingest
    else:
        from ..ingest import ingest

    with progress_bar("ingest") as update:
        result = ingest(cfg, progress=update)
    print_ingest_result(result)
    return result


def run_synth(cfg: SynthConfig) -> str:
    """Write phantoms with a progress bar; returns the manifest.csv URI."""
    from ..synth import write_phantoms

    total = cfg.n_per_class * len(CLASSES)
    with progress_bar("synth") as update:
        manifest = write_phantoms(
            cfg.dest,
            cfg.n_per_class,
            seed=cfg.seed,
            size=cfg.size,
            progress=lambda k: update(k, total),
            style=cfg.style,
        )
    console.print(f"wrote {total} phantoms: {manifest}")
    return manifest


def cmd_ingest(args: argparse.Namespace) -> int:
    result = run_ingest(config_from_args(IngestConfig, args))
    print(result.model_dump_json())
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    run_synth(config_from_args(SynthConfig, args))
    return 0


COMMANDS = (
    Command(
        "ingest",
        IngestConfig,
        cmd_ingest,
        "normalize an X-ray folder (local or s3://), or pull new films from a DICOMweb "
        "archive (dicomweb+https://HOST/PATH, incremental), into a dataset",
        {
            "positional": "src dest",
            "main": "size layout labels links modality study_date ca_bundle",
            "aliases": {"--seed": "split.seed", "--fractions": "split.fractions"},
            "metavars": {"fractions": ("TRAIN", "VAL", "TEST")},
        },
    ),
    Command(
        "synth",
        SynthConfig,
        cmd_synth,
        "write synthetic chest X-ray phantoms with lesion masks",
        {"positional": "dest", "main": "n_per_class seed size"},
    ),
)
