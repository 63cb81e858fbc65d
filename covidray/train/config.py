"""`covidray train` options: one pydantic model, loadable from YAML (see covidray.config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..config import AugmentConfig, Config
from ..models.catalog import BACKBONE_BLOCKS, check_backbone, check_head, parse_freeze

# Frozen bottom blocks by default: EfficientNets keep their stem and first two stages (the
# 112- and 56-pixel, edge-like layers) from ImageNet. That skips their backward pass (much
# less compute per step on a CPU) and regularizes on a few hundred images.
DEFAULT_FREEZE: dict[str, str] = {"efficientnet_lite0": "top:6", "efficientnet_b0": "top:6"}
# Fine-tuning a trained model on a site's data (``init_from``): a tenth of the learning rate,
# a third of the epochs, no warm-up; every field can still be set explicitly.
FINE_TUNE: dict[str, object] = {"lr": 3e-5, "epochs": 6, "warmup_epochs": 0.0}


class TrainConfig(Config):
    """Everything one training run needs. Defaults are the tuned single-CPU-worker recipe."""

    data: str = Field(description="dataset folder or manifest.parquet (local or s3://)")
    out: str = Field(description="output folder: <out>/model, <out>/ray (checkpoints)")
    backbone: str = "efficientnet_lite0"
    weights: str | None = Field(
        "imagenet", description='"imagenet", "imagenet:<variant>", a path/URI, or None (random)'
    )
    weights_sha256: str | None = None
    init_from: str | None = Field(
        None,
        description="fine-tune this model directory on --data: its weights, architecture and "
        "preprocessing, the FINE_TUNE recipe, calibration and gate re-fitted, lineage in the card",
    )
    head: str = "paper"
    freeze: str | None = Field(
        None,
        description='"none", "backbone" or "top:N"; None: DEFAULT_FREEZE of the backbone '
        '(or "none" without pretrained weights)',
    )

    epochs: int = Field(18, ge=1)
    batch_size: int = Field(16, ge=2, description="per worker")
    lr: float = Field(3e-4, gt=0, description="peak learning rate (AdamW)")
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.02, ge=0, le=1, description="final lr / peak lr (cosine)")
    weight_decay: float = Field(1e-4, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    ema_decay: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="validate, select and ship an exponential moving average of the weights "
        "(per optimizer step); None: the raw weights",
    )
    input_size: int = Field(
        320,
        ge=32,
        le=1024,
        description="squashed to this square (320: see the README's results for 224/256/320)",
    )

    workers: int = Field(1, ge=1, description="Ray Train workers")
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has any")
    torch_threads: int | None = Field(
        None, ge=1, description="threads per worker; None: CPUs of this node / workers"
    )

    balance: Literal["none", "class", "class_source"] = Field(
        "class_source",
        description=(
            "sampling weights: none; equal mass per class; or equal mass per class and, within "
            "a class, mass per source proportional to n_source**(1 - source_balance_power)"
        ),
    )
    source_balance_power: float = Field(
        0.5, ge=0, le=1, description="0: sources weighted by size, 1: every source equal"
    )
    augment: AugmentConfig = AugmentConfig()
    augment_with: str | None = Field(
        None, description="dataset/manifest of extra (e.g. synthetic) rows, added to TRAIN only"
    )
    views: str | None = Field(
        None,
        description="dataset whose rows state their view (lateral or frontal, labelled or not, "
        "e.g. an ingested ../shared/data/views): fits the input gate's view check",
    )

    # Recipe options against source shortcuts (docs/source-study.md); every one off by default.
    contrast: Literal["none", "clahe", "equalize"] = Field(
        "none",
        description="contrast normalisation of every model input (CLAHE or histogram "
        "equalisation), recorded in the model card: evaluate, the nightly job and the endpoint "
        "apply it too",
    )
    acquisition_augment: bool = Field(
        False,
        description="augment the batch as other scanners would have taken it: gamma, contrast, "
        "blur, noise, sharpening, down-and-up sampling, JPEG artefacts",
    )
    group_dro_step: float = Field(
        0.0,
        ge=0,
        description="group DRO over the (source x label) cells of train: step size of the "
        "cells' weights (e.g. 0.01); 0: off",
    )
    source_adversary: float = Field(
        0.0,
        ge=0,
        description="weight of the reversed gradient of a class-conditional source classifier "
        "on the pooled features (e.g. 0.1); 0: off",
    )
    mix: Literal["none", "mixup", "cutmix"] = Field("none", description="mix films of a batch")
    mix_alpha: float = Field(0.4, gt=0, description="Beta(alpha, alpha) of the mix share")

    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many epochs without a better val macro-F1"
    )
    max_failures: int = Field(2, ge=0, description="worker-group restarts from a checkpoint")
    num_to_keep: int = Field(2, ge=1, description="Ray Train checkpoints kept")
    run_name: str | None = Field(
        None, description="Ray Train run name; reusing one with the same out resumes that run"
    )
    seed: int = 0
    tta_hflip: bool = Field(True, description="average predictions over a horizontal flip")
    eval_batch_size: int = Field(64, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _fine_tune_recipe(cls, data: object) -> object:
        if isinstance(data, dict) and cls._none_words(data.get("init_from")):
            data = {**FINE_TUNE, **data}
        return data

    @model_validator(mode="before")
    @classmethod
    def _default_freeze(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("freeze") is None:
            backbone = data.get("backbone", "efficientnet_lite0")
            pretrained = cls._none_words(data.get("weights", "imagenet")) is not None
            freeze = DEFAULT_FREEZE.get(backbone, "none") if pretrained else "none"
            data = {**data, "freeze": freeze}
        return data

    @field_validator(
        "weights", "weights_sha256", "augment_with", "init_from", "views", mode="before"
    )
    @classmethod
    def _none_words(cls, v: object) -> object:
        if isinstance(v, str) and v.strip().lower() in ("", "none", "null", "random"):
            return None
        return v

    _known_backbone = field_validator("backbone")(check_backbone)
    _known_head = field_validator("head")(check_head)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        parse_freeze(self.freeze, BACKBONE_BLOCKS[self.backbone])
        if self.warmup_epochs > self.epochs:
            raise ValueError("warmup_epochs must not exceed epochs")
        return self
