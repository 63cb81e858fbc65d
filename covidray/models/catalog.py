"""The backbones and heads by name, without torch: what configs and command lines check.

:mod:`.backbones` builds them; a test keeps the two in step (names, order, freeze units).
"""

from __future__ import annotations

# Freeze units ("blocks", bottom up) of each backbone, for freeze="top:N".
BACKBONE_BLOCKS: dict[str, int] = {
    "vgg16": 5,
    "resnet50": 5,
    "efficientnet_b0": 9,
    "efficientnet_lite0": 9,
}
BACKBONES: tuple[str, ...] = tuple(BACKBONE_BLOCKS)
HEADS: tuple[str, ...] = ("paper", "linear")
FREEZE_HELP = '"none", "backbone" or "top:N"'


def parse_freeze(policy: str, num_blocks: int) -> int:
    """How many top blocks of the backbone train under ``policy``."""
    if policy == "none":
        return num_blocks
    if policy == "backbone":
        return 0
    if policy.startswith("top:"):
        try:
            n = int(policy[4:])
        except ValueError:
            n = -1
        if 0 <= n <= num_blocks:
            return n
        raise ValueError(f"freeze {policy!r}: N must be an integer in [0, {num_blocks}]")
    raise ValueError(f"unknown freeze policy {policy!r}; expected {FREEZE_HELP}")


def check_backbone(name: str) -> str:
    """``name`` if it is a known backbone, else a ValueError listing them."""
    if name not in BACKBONE_BLOCKS:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
    return name


def check_head(kind: str) -> str:
    """``kind`` if it is a known head, else a ValueError listing them."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; expected one of {HEADS}")
    return kind
