"""Configuration: every command's options are one pydantic model, loadable from YAML.

The convention: every options model subclasses :class:`Config` and lives in its package's
``config.py`` (this file for the top-level modules: ingest, synth, decoding, augmentation;
``train/``, ``gan/``, ``score/``, ``report/`` have their own). Config modules import neither
torch, kornia nor Ray, so that a command line or a job submission can build and check them
cheaply. The command line derives its flags from these models; YAML files (``--config``) set
any field; flags override the file, which overrides the defaults here. Secret fields
(``SecretStr``) come from the environment or a file, never from a flag.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from . import storage
from .pacs.fields import (
    ArchiveRequests,
    ArchiveTimeout,
    CaBundle,
    Links,
    Modalities,
    StudyDate,
    is_dicomweb,
    outside,
)

T = TypeVar("T", bound=BaseModel)

PSEUDONYM_KEY_ENV = "COVIDRAY_PSEUDONYM_KEY"


class Config(BaseModel):
    """Base of every options model: unknown fields are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


def _pseudonym_key_from_env() -> SecretStr | None:
    value = os.environ.get(PSEUDONYM_KEY_ENV)
    return SecretStr(value) if value else None


# The site's secret for keyed pseudonyms of patient identifiers (HMAC-SHA256).
PseudonymKey = Annotated[
    SecretStr | None,
    Field(
        default_factory=_pseudonym_key_from_env,
        description=f"HMAC key for patient-id pseudonyms (default: ${PSEUDONYM_KEY_ENV})",
    ),
]


def secret_bytes(value: SecretStr | None) -> bytes | None:
    """The secret's UTF-8 bytes, or None."""
    return value.get_secret_value().encode() if value is not None else None


class SplitConfig(Config):
    """Patient-level stratified split."""

    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)
    seed: int = 0
    stratify: tuple[str, ...] = ("label", "age_group")
    test_sources: tuple[str, ...] = Field(
        (),
        description="sources held out: every film of these goes to test, the rest is split as "
        "without them (a new DEST only; see docs/source-study.md)",
    )

    @field_validator("fractions")
    @classmethod
    def _sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError("split fractions must be non-negative and sum to 1")
        return v


class DecodeConfig(Config):
    max_pixels: int = Field(50_000_000, gt=0, description="refuse images larger than this")
    max_bytes: int = Field(256 * 1024 * 1024, gt=0, description="refuse files larger than this")


# The source layouts ingest recognises (covidray.layouts builds each); ``auto`` detects one.
LAYOUTS = ("class-folders", "manifest", "ieee8023", "kaggle", "dicom")


class IngestConfig(Config):
    """`covidray ingest SRC DEST`."""

    src: str = Field(
        description="raw X-ray folder (local or s3://), or a DICOMweb archive "
        "(dicomweb+https://HOST/PATH: new CR/DX films, incrementally; see docs/pacs.md)"
    )
    dest: str = Field(description="dataset folder (local or s3://)")
    size: int = Field(256, ge=16, le=4096, description="shorter side of the stored PNGs")
    layout: str = Field(
        "auto", description="auto, class-folders, manifest, ieee8023, kaggle, dicom"
    )
    labels: str | None = Field(None, description="CSV (file,label) for unlabelled layouts")
    pseudonym_key: PseudonymKey
    split: SplitConfig = SplitConfig()
    decode: DecodeConfig = DecodeConfig()
    parallel_threshold: int = Field(
        256, ge=0, description="use Ray tasks when there are more input files than this"
    )
    chunk_size: int = Field(32, ge=1, description="files per Ray task")
    keep_source_paths: bool = Field(
        False,
        description="with a pseudonym key, keep the source paths (source_uri) and the source's "
        "own extra columns anyway: only for research sets whose file names identify no one",
    )
    links: Links
    modality: Modalities
    study_date: StudyDate
    ca_bundle: CaBundle
    archive_requests: ArchiveRequests
    archive_timeout_s: ArchiveTimeout

    @field_validator("layout")
    @classmethod
    def _known_layout(cls, v: str) -> str:
        if v != "auto" and v not in LAYOUTS:
            raise ValueError(f"unknown layout {v!r}: choose auto, {', '.join(LAYOUTS)}")
        return v

    @model_validator(mode="after")
    def _distinct(self) -> IngestConfig:
        if self.src.rstrip("/") == self.dest.rstrip("/"):
            raise ValueError("DEST must differ from SRC")
        if is_dicomweb(self.src):
            if not self.links:
                raise ValueError("a DICOMweb source needs --links (the link table's URI)")
            if not outside(self.links, self.dest):
                raise ValueError("--links must lie outside DEST: the dataset never holds UIDs")
        elif self.links:
            raise ValueError("--links is for a DICOMweb source (dicomweb+https://...)")
        return self


class SynthConfig(Config):
    """`covidray synth DEST`."""

    dest: str
    n_per_class: int = Field(40, ge=1)
    seed: int = 0
    size: int = Field(256, ge=64, le=1024)
    style: Literal["a", "b"] = Field("a", description='"b": another site\'s processing')


class DemoConfig(Config):
    """`covidray demo`: the main job end to end on the embedded defaults (local Ray, local
    storage): real X-rays or phantoms → ingest → a short training run → scoring → report."""

    data: str | None = Field(
        None, description="real data folder (manifest.csv layout); phantoms when absent"
    )
    views: str | None = Field(
        None,
        description="view data folder (manifest.csv with a view column, e.g. "
        "../shared/data/views): the short run fits the input gate's view check on it",
    )
    workdir: str = Field("demo-output", description="where everything is written")
    phantoms_per_class: int = Field(60, ge=1, description="phantoms per class without --data")
    epochs: int = Field(
        3,
        ge=1,
        description="training epochs of the short demo run (`covidray train` defaults to the "
        "tuned recipe)",
    )
    input_size: int = Field(224, ge=32, le=1024, description="model input size of the short run")


class CalibrateConfig(Config):
    """`covidray calibrate`: fit the calibration (val) and the input gate (train, val) of an
    existing model directory on a dataset, e.g. a site's own data or a model from before."""

    model: str = Field(description="model directory (local or s3://)")
    data: str = Field(description="dataset folder or manifest.parquet with train and val rows")
    out: str | None = Field(
        None, description="where to write the model directory (default: in place)"
    )
    batch_size: int = Field(64, ge=1, description="images per forward pass")
    device: str | None = Field(None, description="cuda or cpu (default: cuda when available)")
    views: str | None = Field(
        None,
        description="dataset whose rows state their view (lateral or frontal), e.g. an ingested "
        "../shared/data/views: fits the gate's view check (default: keep the model's, if any)",
    )
    gate_layer: list[str] = Field(
        [],
        description="the input gate's feature layer (pool: the head's input); give it more than "
        "once for a multi-layer score, e.g. features.blocks.4 (see bench/gate_layers.py); "
        "default: the backbone's (pool + features.blocks.5 for efficientnet_lite0)",
    )

    @field_validator("gate_layer", mode="before")
    @classmethod
    def _one_or_more(cls, v: object) -> object:
        names = [v] if isinstance(v, str) else v
        if isinstance(names, list | tuple):
            return [n.strip() for name in names for n in str(name).split(",") if n.strip()]
        return v


class AugmentConfig(Config):
    """Training augmentation (:func:`covidray.augment.build_augmentation`); ``None`` (or 0 for
    rotation/shift) switches a transform off."""

    rotation_deg: float = Field(10.0, ge=0, le=180)
    shift: float = Field(0.1, ge=0, lt=1, description="fraction of width and of height")
    hflip: bool = Field(True, description="the paper's choice; moves the heart to the wrong side")
    gamma: tuple[float, float] | None = (0.8, 1.25)
    contrast: tuple[float, float] | None = (0.8, 1.2)
    p_intensity: float = Field(0.5, ge=0, le=1)
    padding_mode: Literal["border", "zeros", "reflection"] = Field(
        "border",
        description='pixels moved in by rotation/shift: "border" repeats the edge (Keras\' '
        'fill_mode="nearest"), "zeros" fills black',
    )

    @field_validator("gamma", "contrast")
    @classmethod
    def _ordered_positive(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] <= v[1]:
            raise ValueError(f"range must satisfy 0 < low <= high, got {v}")
        return v


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` on top; nested mappings merge key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path: str | None = None, **overrides: Any) -> T:
    """Build ``cls`` from an optional YAML file (local or s3://) plus non-None overrides.

    Overrides may be nested mappings (``split={"seed": 1}``): they merge into the file's."""
    data: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(storage.read_text(path)) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        data.update(loaded)
    data = merge(data, {k: v for k, v in overrides.items() if v is not None})
    return cls.model_validate(data)
