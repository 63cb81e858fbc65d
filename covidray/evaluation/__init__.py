"""Evaluating a classifier honestly: ``metrics`` (the figures, with subgroup breakdowns and
flags), ``evaluate`` (running a model directory on a dataset split), ``artifacts`` (the
confusion PNG and markdown written next to a model). Names load on first use."""

from __future__ import annotations

from ..lazy import lazy_attributes

__getattr__, __all__ = lazy_attributes(
    __name__,
    metrics="EvalReport evaluate_predictions",
    evaluate="evaluate_model evaluate_rows",
    artifacts="confusion_png per_class_table_markdown",
)
