"""Running a model on a dataset split (``covidray evaluate``, training's final evaluation):
decode once, batched prediction (with optional flip TTA), metrics with subgroups."""

from __future__ import annotations

import pandas as pd
from torch import nn

from ..dataset import GROUP_COLUMNS, load_images, load_rows
from ..predict import predict_probs
from .config import EVAL_SPLITS
from .metrics import EvalReport, evaluate_predictions


def select_split(rows: pd.DataFrame, split: str) -> pd.DataFrame:
    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {EVAL_SPLITS}")
    chosen = rows if split == "all" else rows[rows["split"] == split]
    if chosen.empty:
        raise ValueError(f"no labelled rows in split {split!r}")
    return chosen.reset_index(drop=True)


def evaluate_rows(
    model: nn.Module,
    rows: pd.DataFrame,
    input_size: int,
    *,
    tta_hflip: bool = False,
    batch_size: int = 64,
) -> EvalReport:
    """Decode ``rows`` (from :func:`load_rows`), predict, and score with subgroup breakdowns."""
    images = load_images(list(rows["uri"]), input_size)
    probs = predict_probs(model, images, batch_size=batch_size, tta_hflip=tta_hflip)
    groups = rows[[c for c in GROUP_COLUMNS if c in rows.columns]].reset_index(drop=True)
    return evaluate_predictions(probs, rows["y"].to_numpy(), groups)


def evaluate_model(
    model_uri: str,
    data_uri: str,
    split: str = "test",
    *,
    tta_hflip: bool | None = None,
    batch_size: int = 64,
    device: str | None = None,
) -> EvalReport:
    """Load the model directory ``model_uri`` and score it on ``split`` of ``data_uri``.

    ``tta_hflip`` defaults to what the model card says the model was selected with.
    """
    from ..modeldir import load_model_dir

    model, card = load_model_dir(model_uri, device=device)
    rows = select_split(load_rows(data_uri), split)
    return evaluate_rows(
        model,
        rows,
        card.preprocessing.input_size,
        tta_hflip=card.tta_hflip if tta_hflip is None else tta_hflip,
        batch_size=batch_size,
    )
