"""Configuration: every command's options are one pydantic model, loadable from YAML.

Command-line flags override the YAML file, which overrides the defaults here.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from . import storage

T = TypeVar("T", bound=BaseModel)

PSEUDONYM_KEY_ENV = "COVIDRAY_PSEUDONYM_KEY"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitConfig(_Config):
    """Patient-level stratified split."""

    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)
    seed: int = 0
    stratify: tuple[str, ...] = ("label", "age_group")

    @field_validator("fractions")
    @classmethod
    def _sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError("split fractions must be non-negative and sum to 1")
        return v


class DecodeConfig(_Config):
    max_pixels: int = Field(50_000_000, gt=0, description="refuse images larger than this")
    max_bytes: int = Field(256 * 1024 * 1024, gt=0, description="refuse files larger than this")


class IngestConfig(_Config):
    """`covidray ingest SRC DEST`."""

    src: str
    dest: str
    size: int = Field(256, ge=16, le=4096, description="shorter side of the stored PNGs")
    layout: str = Field(
        "auto", description="auto, class-folders, manifest, ieee8023, kaggle, dicom"
    )
    labels: str | None = Field(None, description="CSV (file,label) for unlabelled layouts")
    pseudonym_key: SecretStr | None = Field(
        default_factory=lambda: (
            SecretStr(os.environ[PSEUDONYM_KEY_ENV]) if os.environ.get(PSEUDONYM_KEY_ENV) else None
        ),
        description=f"HMAC key for DICOM PatientID pseudonyms (default: ${PSEUDONYM_KEY_ENV})",
    )
    split: SplitConfig = SplitConfig()
    decode: DecodeConfig = DecodeConfig()
    parallel_threshold: int = Field(
        256, ge=0, description="use Ray tasks when there are more input files than this"
    )
    chunk_size: int = Field(32, ge=1, description="files per Ray task")

    @model_validator(mode="after")
    def _distinct(self) -> IngestConfig:
        if self.src.rstrip("/") == self.dest.rstrip("/"):
            raise ValueError("DEST must differ from SRC")
        return self


class SynthConfig(_Config):
    """`covidray synth DEST`."""

    dest: str
    n_per_class: int = Field(40, ge=1)
    seed: int = 0
    size: int = Field(256, ge=64, le=1024)


def load_config(cls: type[T], path: str | None = None, **overrides: Any) -> T:
    """Build ``cls`` from an optional YAML file (local or s3://) plus non-None overrides."""
    data: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(storage.read_text(path)) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return cls.model_validate(data)
