"""Reports built from the scoring job's predictions."""

from __future__ import annotations

from .progression import ReportConfig, ReportSummary, build_report

__all__ = ["ReportConfig", "ReportSummary", "build_report"]
