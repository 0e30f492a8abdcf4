"""Choices shared by the commands that augment; light to import (no torch), for their `--help`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

RENDERERS = ("pil", "torch")
DECODERS = ("libjpeg", "nvjpeg")

# The --renderer flag of every command that augments (the same choice as {"renderer": ...} in --policy)
RendererFlag = Annotated[
    Literal["pil", "torch"] | None,
    Field(
        description="augmentation renderer: pil (timm's transform on the CPU, the default) or torch (random "
        "choices on the CPU, pixels batched on the model's device); each has its own label namespace"
    ),
]

# The --decoder flag beside it (the same choice as {"decoder": ...} in --policy)
DecoderFlag = Annotated[
    Literal["libjpeg", "nvjpeg"] | None,
    Field(
        description="the torch renderer's JPEG decoder: libjpeg (Pillow, where the loader runs; the default) or "
        "nvjpeg (on the CUDA device that renders); the two give different pixels, so each has its own labels"
    ),
]


def policy_overrides(policy: dict, renderer: str | None = None, decoder: str | None = None) -> dict:
    """A command's augmentation overrides: its --policy JSON, then its --renderer and --decoder."""
    flags = {"renderer": renderer, "decoder": decoder}
    return {**policy, **{k: v for k, v in flags.items() if v is not None}}


# The --repeat-mode flag of the trainer and precompute (see schedule.py)
RepeatModeFlag = Annotated[
    Literal["deit", "all"],
    Field(
        description="repeated augmentation: deit (DeiT's RASampler: each epoch about N samples, ceil(N/R) "
        "images R times each, seeds numbered per image) or all (every image R times every epoch, seeds e*R+r)"
    ),
]
