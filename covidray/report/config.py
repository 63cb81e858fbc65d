"""Options of ``covidray report`` (a pydantic model; YAML file + flags, see covidray.config)."""

from __future__ import annotations

from pydantic import Field

from ..config import Config


class ReportConfig(Config):
    """`covidray report --scores URI --out report.html`."""

    scores: str = Field(description="score output folder, its predictions/ or one .parquet")
    out: str = Field(description="the HTML file to write (local or s3://)")
    data: str | None = Field(None, description="dataset: study metadata and images by image_id")
    model_version: str | None = Field(None, description="default: the most recently scored")
    shortcut_threshold: float = Field(
        0.5, gt=0, le=1, description="border energy at or above which a map is flagged"
    )
    thumb_size: int = Field(160, ge=32, le=1024, description="thumbnail height in pixels")
    max_thumbs: int = Field(12, ge=1, description="thumbnails per patient")
    max_table_rows: int = Field(200, ge=1, description="rows listed per flagged/error table")
    title: str = "Chest X-ray scoring: disease progression"
