"""A crop's random choices, drawn on the CPU from its sample seed (the torch renderer's first half):
the crop box (timm's RandomResizedCrop, or DeiT's padded crop at 32 px or less), the flip,
RandAugment's ops with timm's semantics (n ops chosen with replacement from the "increasing" set,
each applied with probability p, magnitude from N(m, mstd) clipped to [0, 10], a random sign where
timm negates), random erasing's boxes and a key for its noise. Microseconds a sample; they need
only the image's size.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .policy import INCREASING_OPS, LEVEL_DENOM, OPS, AugmentPolicy


@dataclass(frozen=True)
class CropParams:
    """Everything random about one crop; `box` is (top, left, height, width) in the source image,
    `ops` the RandAugment ops applied, in order, with their argument, `erase` boxes in the crop."""

    box: tuple[int, int, int, int]
    flip: bool
    ops: tuple[tuple[str, float], ...]
    erase: tuple[tuple[int, int, int, int], ...]
    noise_key: int


def draw_params(policy: AugmentPolicy, sample_seed: int, width: int, height: int) -> CropParams:
    """The random choices of one crop, from its sample seed and its image's size (timm's order)."""
    rng = random.Random(sample_seed)
    if policy.crop == "padded":
        box = padded_crop_box(rng, width, height, policy.input_size, policy.crop_padding)
    else:
        box = resized_crop_box(rng, width, height, policy.scale, policy.ratio)
    flip = rng.random() < policy.hflip
    spec = policy.randaugment
    ops: list[tuple[str, float]] = []
    if spec is not None:
        chosen = [INCREASING_OPS[rng.randrange(len(INCREASING_OPS))] for _ in range(spec.num_layers)]
        for name in chosen:
            if spec.prob < 1.0 and rng.random() > spec.prob:
                continue
            m = spec.magnitude
            if spec.magnitude_std > 0:
                m = rng.gauss(m, spec.magnitude_std)
            m = max(0.0, min(m, spec.magnitude_max))
            ops.append((name, OPS[name].argument(m / LEVEL_DENOM, rng)))
    size = policy.input_size
    erase: list[tuple[int, int, int, int]] = []
    if policy.re_prob > 0 and rng.random() <= policy.re_prob:
        count = policy.re_count
        for _ in range(count):
            for _attempt in range(10):
                target = rng.uniform(0.02, 1 / 3) * size * size / count
                aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
                h = int(round(math.sqrt(target * aspect)))
                w = int(round(math.sqrt(target / aspect)))
                if w < size and h < size:
                    erase.append((rng.randint(0, size - h), rng.randint(0, size - w), h, w))
                    break
    return CropParams(box, flip, tuple(ops), tuple(erase), rng.getrandbits(64))


def resized_crop_box(rng: random.Random, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """timm's RandomResizedCropAndInterpolation.get_params, drawing from `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if w <= width and h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def check_padded_fits(width: int, height: int, size: int, pad: int) -> None:
    """A padded crop needs the image, padded, at least as large as the crop."""
    if height + 2 * pad < size or width + 2 * pad < size:
        raise ValueError(
            f"a {width}x{height} image padded by {pad} px is smaller than the {size} px crop "
            "(the padded crop, DeiT's at 32 px or less, takes images of about the input size)"
        )


def padded_crop_box(rng: random.Random, width: int, height: int, size: int, pad: int) -> tuple[int, int, int, int]:
    """torchvision's RandomCrop(size, padding=pad) box, drawing from `rng`, in the image's own
    coordinates: (top, left, size, size), reaching up to `pad` pixels past the image's edges."""
    check_padded_fits(width, height, size, pad)
    if (height + 2 * pad, width + 2 * pad) == (size, size):
        return -pad, -pad, size, size
    return rng.randint(0, height + 2 * pad - size) - pad, rng.randint(0, width + 2 * pad - size) - pad, size, size
