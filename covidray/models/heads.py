"""Classification heads on top of globally average-pooled backbone features."""

from __future__ import annotations

from torch import nn

from .catalog import HEADS


def build_head(kind: str, in_features: int, num_classes: int) -> nn.Sequential:
    """The head that maps pooled features ``(B, in_features)`` to logits ``(B, num_classes)``.

    - ``"paper"`` (Zebin et al. 2020): Linear(D, 64) -> ReLU -> Dropout(0.5) -> Linear(64, C).
    - ``"linear"``: Dropout(0.2) -> Linear(D, C).

    Logits come out; softmax is applied at inference time.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if kind == "paper":
        return nn.Sequential(
            nn.Linear(in_features, 64),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(64, num_classes),
        )
    if kind == "linear":
        return nn.Sequential(nn.Dropout(0.2), nn.Linear(in_features, num_classes))
    raise ValueError(f"unknown head {kind!r}; expected one of {HEADS}")
