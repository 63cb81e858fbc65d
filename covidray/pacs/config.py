"""Options of the PACS commands (``covidray publish``, ``covidray nightly``) and the DICOMweb
fields ``covidray ingest`` shares with them. Credentials are never options: they come from the
environment (:mod:`covidray.pacs.client`)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from ..config import Config, PseudonymKey
from .fields import (
    ArchiveRequests,
    ArchiveTimeout,
    ArchiveUrl,
    CaBundle,
    Modalities,
    StudyDate,
    archive_url,
    outside,
)


class ArchiveOptions(Config):
    """What every command that talks to an archive shares."""

    ca_bundle: CaBundle
    archive_requests: ArchiveRequests
    archive_timeout_s: ArchiveTimeout


class PublishOptions(Config):
    """How results are stored (STOW-RS)."""

    store_batch: int = Field(
        8,
        ge=1,
        le=256,
        description="films per STOW-RS request (each: an SR, and an overlay in scope)",
    )
    store_retries: int = Field(
        3, ge=0, le=20, description="retries of a failed STOW-RS request before it is reported"
    )
    store_retry_wait_s: float = Field(
        1.0, ge=0, description="wait before the first retry (doubled each time)"
    )
    lock_stale_after_s: float = Field(
        600.0, gt=0, description="a lock without a heartbeat for this long is taken over"
    )
    lock_wait_s: float = Field(0.0, ge=0, description="wait this long for another run's lock")


class PublishConfig(ArchiveOptions, PublishOptions):
    """`covidray publish --scores OUT --data DEST --links URI --to dicomweb+https://...`."""

    scores: str = Field(description="the scoring output (`covidray score --out`): its ledger too")
    data: str = Field(description="the dataset the films were pulled into (the overlays' films)")
    links: str = Field(description="the link table the pull wrote (`covidray ingest --links`)")
    to: ArchiveUrl = Field(description="archive to store the SRs and overlays in (STOW-RS)")
    pseudonym_key: PseudonymKey

    @model_validator(mode="after")
    def _links_outside(self) -> PublishConfig:
        if not outside(self.links, self.data):
            raise ValueError("--links must lie outside the dataset (--data)")
        return self


class NightlyConfig(ArchiveOptions, PublishOptions):
    """`covidray nightly --source ARCHIVE --data DEST --links URI --model M --out OUT`."""

    source: ArchiveUrl = Field(description="archive to pull from (QIDO-RS, WADO-RS)")
    to: str | None = Field(None, description="archive to publish to (STOW-RS); default: --source")
    data: str = Field(description="dataset folder the pull grows (local or s3://)")
    links: str = Field(description="link table URI, outside --data")
    model: str = Field(description="model directory (local or s3://)")
    out: str = Field(description="scores output (as `covidray score --out`), ledger and lock")
    modality: Modalities
    study_date: StudyDate
    size: int = Field(256, ge=16, le=4096, description="shorter side of the stored films")
    workers: int | None = Field(None, ge=1, description="scoring actors (as covidray score)")
    batch_size: int = Field(32, ge=1, le=4096, description="images per model call")
    pseudonym_key: PseudonymKey

    @field_validator("to")
    @classmethod
    def _to_archive(cls, v: str | None) -> str | None:
        return None if v is None else archive_url(v)

    @model_validator(mode="after")
    def _links_outside(self) -> NightlyConfig:
        if not outside(self.links, self.data):
            raise ValueError("--links must lie outside the dataset (--data)")
        return self
