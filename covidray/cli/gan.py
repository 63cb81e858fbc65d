"""``covidray gan train`` and ``covidray gan generate``: CycleGAN augmentation."""

from __future__ import annotations

import argparse

from ..gan.config import GanConfig, GenerateConfig
from .flags import Command, config_from_args
from .render import console, epoch_printer, gan_epoch_line, progress_bar

FILTERS = ("source", "age_group", "view")


def cmd_gan_train(args: argparse.Namespace) -> int:
    """Train the CycleGAN on Ray Train; write <out>/generator.* and <out>/samples/."""
    from ..gan.train import run_gan_training

    cfg = config_from_args(GanConfig, args)
    console.rule(
        f"[bold]CycleGAN {cfg.domain_a} → {cfg.domain_b} on {cfg.data} at {cfg.size} px "
        f"({cfg.workers} worker(s))"
    )
    result = run_gan_training(cfg, on_epoch=epoch_printer(cfg.epochs, gan_epoch_line))
    console.rule(
        f"[bold green]generator {result.generator_version}: {result.total_steps} steps, "
        f"{result.s_per_iter:.2f} s/iter, {result.wall_s:.0f} s: {result.generator_uri}"
    )
    print(result.model_dump_json(exclude={"history"}))
    return 0


def cmd_gan_generate(args: argparse.Namespace) -> int:
    """Translate TRAIN-split domain-A images into a synthetic dataset at --out."""
    from ..gan.generate import generate

    cfg = config_from_args(GenerateConfig, args)
    with progress_bar("generate") as update:
        result = generate(cfg, progress=update)
    console.print(
        f"wrote {result.n_images} synthetic {result.label} images from {result.n_sources} "
        f"sources (generator {result.generator_version}): {result.manifest_uri}"
    )
    print(result.model_dump_json())
    return 0


GROUP_HELP = "CycleGAN augmentation: train a generator, generate images"


def _filter_aliases(*prefixes: str) -> dict[str, tuple[str, ...]]:
    """``--source`` etc. set the field in every domain filter named by ``prefixes``."""
    return {
        "--" + name.replace("_", "-"): tuple(f"{p}.{name}" for p in prefixes) for name in FILTERS
    }


COMMANDS = (
    Command(
        "train",
        GanConfig,
        cmd_gan_train,
        "train a CycleGAN on Ray Train (TRAIN split only)",
        {
            "main": "data out size ngf n_blocks epochs iterations workers batch_size log_every "
            "run_name seed",
            "aliases": {
                "--from": "domain_a",
                "--to": "domain_b",
                "--threads": "torch_threads",
                **_filter_aliases("filter_a", "filter_b"),
            },
        },
    ),
    Command(
        "generate",
        GenerateConfig,
        cmd_gan_generate,
        "translate TRAIN-split normals into a dataset",
        {"main": "model data n out device seed", "aliases": _filter_aliases("filter")},
    ),
)
