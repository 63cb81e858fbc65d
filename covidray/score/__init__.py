"""Batch scoring: the nightly rescoring job (Ray Data) and its prediction files.

``config`` (options), ``inputs`` (what to read), ``stages`` (read/decode, score, write),
``job`` (the Ray Data driver), ``results`` (the prediction files). Importing the package loads
none of them; the names below load on first use.
"""

from __future__ import annotations

from ..lazy import lazy_attributes

__getattr__, __all__ = lazy_attributes(
    __name__,
    config="ScoreConfig",
    job="ScoreResult run_score",
    results="PREDICTIONS_SCHEMA=SCHEMA read_predictions scored_ids",
)
