"""Options of ``covidray evaluate`` (a pydantic model; YAML file + flags, see covidray.config)."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, field_validator

from ..config import Config

Split = Literal["test", "val", "train", "all"]
EVAL_SPLITS: tuple[str, ...] = get_args(Split)


class EvaluateConfig(Config):
    """`covidray evaluate --model URI --data URI [--split test]`."""

    model: list[str] = Field(
        description="model directory (local or s3://); give --model twice to compare two models "
        "on the same data side by side"
    )
    data: str = Field(description="dataset folder or manifest.parquet")
    split: Split = Field("test", description="rows to score")
    batch_size: int = Field(64, ge=1, description="images per forward pass")
    device: str | None = Field(None, description="cuda or cpu (default: cuda when available)")

    @field_validator("model", mode="before")
    @classmethod
    def _one_or_more(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v
