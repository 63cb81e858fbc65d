"""``covidray nightly`` (``jobs/nightly.py``): pull → score → publish, under the output's lock.

One run per output at a time (:class:`covidray.score.lock.OutputLock` on ``--out``, held from
before the pull to after the last STOW-RS). A run whose lock another run took over stops
before its next batch (pull's writes, each scoring batch, each STOW-RS batch) and fails in one
line (:class:`covidray.score.lock.LockLost`): two runs never both publish. Both archives are
checked (credentials, reachability) before any work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from ..config import IngestConfig
from ..ingest import IngestResult
from ..score.config import ScoreConfig
from ..score.lock import OutputLock
from .client import Archive
from .config import NightlyConfig, PublishConfig
from .publish import PublishResult, publish_unlocked
from .pull import pull

Step = Callable[[str, Any], None]  # (step name, its result) once a step is done


class NightlyResult(BaseModel):
    """The three steps' results and the run's wall time."""

    pull: IngestResult
    score: Any  # covidray.score.job.ScoreResult (imported lazily: it loads Ray)
    publish: PublishResult
    wall_s: float


def configs(cfg: NightlyConfig) -> tuple[IngestConfig, ScoreConfig, PublishConfig]:
    """The three steps' options from the nightly's."""
    archive = {
        "ca_bundle": cfg.ca_bundle,
        "archive_requests": cfg.archive_requests,
        "archive_timeout_s": cfg.archive_timeout_s,
    }
    key = {"pseudonym_key": cfg.pseudonym_key}
    ingest = IngestConfig(
        src=cfg.source,
        dest=cfg.data,
        links=cfg.links,
        modality=cfg.modality,
        study_date=cfg.study_date,
        size=cfg.size,
        **archive,
        **key,
    )
    score = ScoreConfig(
        model=cfg.model,
        data=cfg.data,
        out=cfg.out,
        workers=cfg.workers,
        batch_size=cfg.batch_size,
        lock=False,  # the nightly holds it
        **key,
    )
    publish = PublishConfig(
        scores=cfg.out,
        data=cfg.data,
        links=cfg.links,
        to=cfg.to or cfg.source,
        store_batch=cfg.store_batch,
        store_retries=cfg.store_retries,
        store_retry_wait_s=cfg.store_retry_wait_s,
        **archive,
        **key,
    )
    return ingest, score, publish


def run_nightly(cfg: NightlyConfig, on_step: Step | None = None) -> NightlyResult:
    """Pull, score and publish (see the module docstring)."""
    from ..score.job import record_run, score_unlocked

    t0 = time.time()
    ingest_cfg, score_cfg, publish_cfg = configs(cfg)
    for url in dict.fromkeys([cfg.source, publish_cfg.to]):
        Archive(url, ca_bundle=cfg.ca_bundle, timeout_s=cfg.archive_timeout_s).check()
    with OutputLock(cfg.out, stale_after_s=cfg.lock_stale_after_s, wait_s=cfg.lock_wait_s) as lock:
        pulled = pull(ingest_cfg, stop=lock.check)
        if on_step:
            on_step("pull", pulled)
        lock.check()
        scored = record_run(score_cfg, score_unlocked(score_cfg, stop=lock.check))
        if on_step:
            on_step("score", scored)
        lock.check()
        published = publish_unlocked(publish_cfg, stop=lock.check)
        if on_step:
            on_step("publish", published)
    return NightlyResult(
        pull=pulled, score=scored, publish=published, wall_s=round(time.time() - t0, 3)
    )
