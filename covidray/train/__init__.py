"""Training on Ray Train: ``config`` (options), ``data`` (balanced sampling), ``loop`` (the
per-worker loop), ``trainer`` (the driver). Importing the package loads no Ray and no torch."""

from __future__ import annotations

from ..lazy import lazy_attributes
from .config import TrainConfig

__getattr__, _lazy = lazy_attributes(__name__, trainer="TrainResult run_training")
__all__ = ["TrainConfig", *_lazy]
