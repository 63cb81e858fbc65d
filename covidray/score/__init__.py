"""Batch scoring: the nightly rescoring job (Ray Data) and its prediction files."""

from __future__ import annotations

from .config import ScoreConfig
from .pipeline import ScoreResult, run_score
from .results import SCHEMA as PREDICTIONS_SCHEMA
from .results import read_predictions, scored_ids

__all__ = [
    "PREDICTIONS_SCHEMA",
    "ScoreConfig",
    "ScoreResult",
    "read_predictions",
    "run_score",
    "scored_ids",
]
