"""Options of ``covidray submit`` and ``covidray jobs`` (a Ray cluster's Jobs API); no Ray
import, so that the command line can build and check them cheaply."""

from __future__ import annotations

import os

from pydantic import Field

from ..config import Config

ADDRESS_ENV = "RAY_ADDRESS"


def _address_from_env() -> str | None:
    return os.environ.get(ADDRESS_ENV) or None


class JobsConfig(Config):
    """Where the cluster's Jobs API is. Its token (Ray's token authentication) is never an
    option: it comes from ``RAY_AUTH_TOKEN`` or the file named by ``RAY_AUTH_TOKEN_PATH``."""

    address: str | None = Field(
        default_factory=_address_from_env,
        description=f"Ray Jobs API (the dashboard), e.g. http://head:8265 (default: "
        f"${ADDRESS_ENV})",
    )


class SubmitConfig(JobsConfig):
    """`covidray submit COMMAND [options] -- ARGS`: run `covidray COMMAND ARGS` as a Ray job."""

    wait: bool = Field(
        True,
        description="follow the job's logs and return its exit status (Ctrl-C stops the job); "
        "--no-wait prints the job id and returns",
    )
    runtime_env: str | None = Field(
        None,
        description="YAML or JSON file of more runtime env fields (Ray's format), merged over "
        "covidray's; it must hold no credentials",
    )
    working_dir: str = Field(
        "auto",
        description="the code the job runs: 'auto' (this checkout when covidray runs from one, "
        "else the package installed on the cluster's image), 'installed', or a checkout folder",
    )
    s3_settings: bool = Field(
        True,
        description="give the job this shell's S3 endpoint and region (values only; "
        "credentials never travel: the cluster's pods have their own)",
    )
