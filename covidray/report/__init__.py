"""Reports built from the scoring job's predictions (``config``: options; ``progression``: the
HTML disease-progression report). Names load on first use."""

from __future__ import annotations

from ..lazy import lazy_attributes

__getattr__, __all__ = lazy_attributes(
    __name__, config="ReportConfig", progression="ReportSummary build_report"
)
