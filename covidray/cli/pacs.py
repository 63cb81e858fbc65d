"""``covidray publish`` and ``covidray nightly``: results back into the PACS (DICOMweb)."""

from __future__ import annotations

import argparse
from typing import Any

from ..pacs.config import NightlyConfig, PublishConfig
from .flags import Command, config_from_args
from .render import console, print_ingest_result, score_table


def publish_line(result: Any) -> str:
    failed = ", ".join(f"{k} {v}" for k, v in sorted(result.failed_reasons.items()))
    return (
        f"published {result.n_published} of {result.n_pending} film(s) "
        f"({result.n_sr} SR, {result.n_sc} overlay(s)); {result.n_in_ledger} published before"
        + (f"; not published: {failed} (tried again next run)" if failed else "")
    )


def cmd_publish(args: argparse.Namespace) -> int:
    """SRs and overlays of scored films back into their studies (STOW-RS)."""
    from ..pacs.publish import publish

    result = publish(config_from_args(PublishConfig, args))
    console.print(publish_line(result))
    print(result.model_dump_json())
    return 0 if result.n_failed == 0 else 1


def cmd_nightly(args: argparse.Namespace) -> int:
    """Pull new films, score them, publish the results: one run under the output's lock."""
    from ..pacs.nightly import run_nightly

    def step(name: str, result: Any) -> None:
        if name == "pull":
            print_ingest_result(result)
        elif name == "score":
            console.print(score_table(result))
        else:
            console.print(publish_line(result))

    cfg = config_from_args(NightlyConfig, args)
    result = run_nightly(cfg, on_step=step)
    print(result.model_dump_json())
    return 0 if result.publish.n_failed == 0 else 1


COMMANDS = (
    Command(
        "publish",
        PublishConfig,
        cmd_publish,
        "store SRs and Grad-CAM overlays of scored films in their studies (DICOMweb STOW-RS)",
        {"main": "scores data links to ca_bundle store_batch"},
    ),
    Command(
        "nightly",
        NightlyConfig,
        cmd_nightly,
        "pull new films from a DICOMweb archive, score them, publish the results (one run "
        "under the output's lock)",
        {"main": "source to data links model out modality study_date ca_bundle workers"},
    ),
)
