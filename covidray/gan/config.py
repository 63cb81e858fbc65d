"""`covidray gan train|generate` options: pydantic models, loadable from YAML (covidray.config).

The default domain filter keeps **adults only** on both sides: the Kaggle normals are young
children and every COVID-19 film is of an adult, so a GAN from all normals to COVID-19 learns
mostly "child → adult" instead of "healthy lungs → COVID-19 findings".
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from ..config import Config
from ..labels import check_class


class DomainFilter(Config):
    """Which manifest rows of a class form a GAN domain: each field lists accepted values.

    ``None`` accepts any value (also a missing one). Comparison is case-insensitive.
    """

    source: list[str] | None = None
    age_group: list[str] | None = ["adult"]
    view: list[str] | None = None

    @field_validator("source", "age_group", "view", mode="before")
    @classmethod
    def _listify(cls, v: object) -> object:
        """``"a,b"``, ``["a,b", "c"]`` (a flag given twice) → ``["a", "b", "c"]``; "any" → None."""
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            items = [s.strip() for x in v for s in x.split(",") if s.strip()]
            return (
                None
                if [i.lower() for i in items] in ([], ["any"], ["all"], ["none"], ["null"])
                else items
            )
        return v

    def mask(self, rows: pd.DataFrame) -> np.ndarray:
        """Boolean mask of the rows of ``rows`` that pass every field of the filter."""
        keep = np.ones(len(rows), dtype=bool)
        for column in ("source", "age_group", "view"):
            allowed = getattr(self, column)
            if allowed is None:
                continue
            wanted = {a.lower() for a in allowed}
            values = rows[column] if column in rows.columns else pd.Series([None] * len(rows))
            keep &= np.array(
                [v is not None and not pd.isna(v) and str(v).lower() in wanted for v in values],
                dtype=bool,
            )
        return keep


class GanConfig(Config):
    """One CycleGAN training run (domain A → domain B, TRAIN split only)."""

    data: str = Field(description="dataset folder or manifest.parquet (local or s3://)")
    out: str = Field(description="output folder: generator.*, samples/, ray/ (checkpoints)")
    domain_a: str = Field("normal", description="label of domain A (translated from)")
    domain_b: str = Field("covid", description="label of domain B (translated to)")
    filter_a: DomainFilter = DomainFilter()
    filter_b: DomainFilter = DomainFilter()

    size: int = Field(128, ge=32, le=1024, description="square GAN resolution (multiple of 4)")
    ngf: int = Field(32, ge=4, description="generator base width (paper/reference: 64)")
    n_blocks: int = Field(6, ge=1, description="generator residual blocks (reference: 9 at 256)")
    ndf: int = Field(64, ge=4, description="discriminator base width")
    d_layers: int = Field(3, ge=1, description="PatchGAN layers: 3 gives 70×70 patches")

    epochs: int = Field(10, ge=1)
    iterations: int | None = Field(
        None,
        ge=1,
        description="total steps per worker; None: each epoch is max(|A|, |B|) / (W × batch)",
    )
    batch_size: int = Field(1, ge=1, description="per worker")
    lr: float = Field(2e-4, gt=0)
    beta1: float = Field(0.5, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    decay_start: float = Field(
        0.5, ge=0, le=1, description="share of steps at constant lr before linear decay to 0"
    )
    lambda_cycle: float = Field(10.0, ge=0)
    lambda_identity: float = Field(0.5, ge=0, description="× lambda_cycle")
    pool_size: int = Field(50, ge=0)
    jitter: float = Field(
        0.12, ge=0, le=0.5, description="load at size×(1+jitter), random-crop size (0: none)"
    )
    hflip: bool = Field(False, description="random horizontal flips (off: heart side matters)")

    workers: int = Field(1, ge=1, description="Ray Train workers")
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has any")
    amp: bool = Field(True, description="mixed precision (CUDA only)")
    torch_threads: int | None = Field(None, ge=1)
    sample_count: int = Field(6, ge=1, le=32, description="columns of the per-epoch sample grid")
    log_every: int = Field(0, ge=0, description="rank 0 prints progress every N steps (0: off)")
    checkpoint_pool: bool = Field(True, description="keep rank 0's image pools in checkpoints")
    max_failures: int = Field(2, ge=0)
    num_to_keep: int = Field(2, ge=1)
    run_name: str | None = Field(None, description="reuse with the same out to resume the run")
    seed: int = 0

    _known_label = field_validator("domain_a", "domain_b")(check_class)

    @model_validator(mode="after")
    def _check(self) -> GanConfig:
        if self.domain_a == self.domain_b and self.filter_a == self.filter_b:
            raise ValueError("domain A and domain B are the same rows")
        if self.size % 4:
            raise ValueError("size must be a multiple of 4 (two stride-2 stages)")
        return self


class GenerateConfig(Config):
    """`covidray gan generate`: translate TRAIN-split domain-A images with a saved generator."""

    model: str = Field(description="folder with generator.safetensors and generator.json")
    data: str = Field(description="dataset folder or manifest.parquet (local or s3://)")
    out: str = Field(description="output dataset folder (manifest.parquet, images/)")
    n: int = Field(100, ge=1)
    filter: DomainFilter | None = Field(None, description="None: the generator's own filter_a")
    reuse: Literal["jitter", "never"] = Field(
        "jitter",
        description="when n exceeds the sources: reuse them with a random crop, or stop short",
    )
    batch_size: int = Field(8, ge=1)
    device: str | None = Field(None, description="None: cuda when available, else cpu")
    seed: int = 0
