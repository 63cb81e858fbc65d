"""Training on Ray Train: config, data, the per-worker loop, the driver, evaluation."""

from __future__ import annotations

from .config import TrainConfig

__all__ = ["TrainConfig", "TrainResult", "evaluate_model", "run_training"]


def __getattr__(name: str):  # keep `import covidray.train` light (no Ray, no torch)
    if name in ("run_training", "TrainResult"):
        from . import trainer

        return getattr(trainer, name)
    if name == "evaluate_model":
        from .evaluate import evaluate_model

        return evaluate_model
    raise AttributeError(name)
