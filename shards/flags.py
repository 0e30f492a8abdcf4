"""Choices shared by the commands that augment; light to import (no torch), for their `--help`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

RENDERERS = ("pil", "torch")

# The --renderer flag of every command that augments (the same choice as {"renderer": ...} in --policy)
RendererFlag = Annotated[
    Literal["pil", "torch"] | None,
    Field(
        description="augmentation renderer: pil (timm's transform on the CPU, the default) or torch (random "
        "choices on the CPU, pixels batched on the model's device); each has its own label namespace"
    ),
]

# The --repeat-mode flag of the trainer and precompute (see schedule.py)
RepeatModeFlag = Annotated[
    Literal["deit", "all"],
    Field(
        description="repeated augmentation: deit (DeiT's RASampler: each epoch about N samples, ceil(N/R) "
        "images R times each, seeds numbered per image) or all (every image R times every epoch, seeds e*R+r)"
    ),
]
