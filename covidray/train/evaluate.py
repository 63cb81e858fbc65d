"""Scoring a model on a dataset split: batched prediction (with optional flip TTA) + metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..metrics import EvalReport, evaluate_predictions
from ..preprocess import from_uint8
from .data import GROUP_COLUMNS, load_images, load_rows

EVAL_SPLITS: tuple[str, ...] = ("test", "val", "train", "all")


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images_u8: torch.Tensor,
    *,
    batch_size: int = 64,
    tta_hflip: bool = False,
    device: torch.device | str | None = None,
    autocast: bool = False,
) -> np.ndarray:
    """Softmax probabilities ``(N, C)`` for cached uint8 images, model in eval mode.

    With ``tta_hflip`` the probabilities of each image and its mirror image are averaged.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images_u8), batch_size):
            x = from_uint8(images_u8[start : start + batch_size].to(device, non_blocking=True))
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                p = model(x).float().softmax(-1)
                if tta_hflip:
                    p = 0.5 * (p + model(x.flip(-1)).float().softmax(-1))
            out.append(p.cpu())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy()


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
