"""The Serve application's arguments (``serving/config.yaml``'s ``args``, ``covidray serve``'s
flags): one pydantic model, importable without torch, kornia or Ray."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, model_validator

from covidray.config import Config

API_TOKEN_ENV = "COVIDRAY_API_TOKEN"


class ServingConfig(Config):
    """`serving.app:build_app` arguments."""

    model: str = Field(description="model directory: a local path or s3://bucket/prefix")
    max_batch_size: int = Field(16, ge=1, le=256, description="images per model call")
    batch_wait_timeout_s: float = Field(
        0.02, ge=0, le=5, description="how long a batch waits to fill before it runs"
    )
    min_replicas: int = Field(1, ge=0, description="model replicas, autoscaling lower bound")
    max_replicas: int = Field(2, ge=1, description="model replicas, autoscaling upper bound")
    target_ongoing_requests: float = Field(
        16, gt=0, description="autoscaling target of requests in flight per model replica"
    )
    max_queued_requests: int = Field(
        64, ge=1, description="requests waiting per caller; beyond this 503 with Retry-After"
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After on 503 answers, seconds")
    ingress_replicas: int = Field(1, ge=1, description="FastAPI ingress replicas")
    num_cpus: float = Field(1, ge=0, description="Ray CPUs per model replica")
    num_gpus: float = Field(
        0,
        ge=0,
        description="GPUs per model replica (explicit: an autoscaled GPU group can start with "
        "no GPU node when the application deploys)",
    )
    threads: int | None = Field(
        None, ge=1, description="torch threads per model replica (default: the node's cores)"
    )
    device: str | None = Field(None, description="cuda or cpu (default: cuda when present)")
    amp: bool | None = Field(None, description="autocast (default: on CUDA only)")
    model_timeout_s: float = Field(
        60, gt=0, description="a request's wait for the model; then 503 with Retry-After"
    )
    ingress_num_cpus: float = Field(0.5, ge=0, description="Ray CPUs per ingress replica")
    max_body_bytes: int = Field(
        25 * 2**20, ge=1024, description="413 above this Content-Length (bytes)"
    )
    max_batch_images: int = Field(16, ge=1, description="images per /v1/predict:batch request")
    decode_threads: int = Field(2, ge=1, description="decoding threads per ingress replica")
    api_token_file: str | None = Field(
        None,
        description=f"file holding the bearer token (a mounted Secret); else ${API_TOKEN_ENV}; "
        "neither: no authentication",
    )

    @model_validator(mode="after")
    def _replica_range(self) -> ServingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self

    @property
    def max_ongoing_requests(self) -> int:
        """Per model replica: room for one batch computing and one forming, so that a batch
        can fill to ``max_batch_size`` (Serve's default of 5 would cap every batch at 5)."""
        return 2 * self.max_batch_size

    @property
    def ingress_max_ongoing_requests(self) -> int:
        """Per ingress replica: every model replica's share, plus requests still decoding."""
        total = self.max_ongoing_requests * self.max_replicas + self.max_queued_requests
        return max(self.max_batch_size, -(-total // self.ingress_replicas))


def api_token(cfg: ServingConfig) -> str | None:
    """The bearer token requests must carry: ``api_token_file``'s content, else
    ``$COVIDRAY_API_TOKEN``; None when neither is set (then nothing is checked)."""
    if cfg.api_token_file:
        return Path(cfg.api_token_file).read_text().strip() or None
    return os.environ.get(API_TOKEN_ENV) or None
