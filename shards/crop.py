"""The crop: a box cut out of the decoded image, resized to S x S with Pillow's antialiased filter,
flipped: a uint8 (3, S, S). From a Pillow image (`crop_image`: Pillow itself, timm's
RandomResizedCrop byte for byte) or from a decoded uint8 tensor on any device (`crop_tensor`,
`resized_regions`: Pillow's resize arithmetic, `resample.py`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .params import CropParams
from .resample import resize_u8

PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def to_uint8_chw(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a contiguous (3, H, W) uint8 tensor."""
    arr = np.asarray(image.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def crop_image(image: Image.Image, params: CropParams, policy) -> torch.Tensor:
    """timm's RandomResizedCrop and flip of a Pillow image under `params`: Pillow's crop, resize and
    transpose (the pil renderer's first two steps), as a uint8 (3, S, S). A padded crop's box is
    already S x S: Pillow fills what lies past the image with black and the resize is a copy."""
    top, left, h, w = params.box
    size = policy.input_size
    out = image.crop((left, top, left + w, top + h)).resize((size, size), PIL_FILTERS[policy.interpolation])
    if params.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_uint8_chw(out)


def cut_region(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The box (top, left, h, w) of a decoded (3, H, W) uint8 tensor, on its device: black past the
    image's edges (a padded crop), as Pillow's crop."""
    top, left, h, w = box
    height, width = image.shape[-2:]
    outside = (max(-left, 0), max(left + w - width, 0), max(-top, 0), max(top + h - height, 0))
    if any(outside):
        image = torch.nn.functional.pad(image, outside)
        top, left = top + outside[2], left + outside[0]
    return image[:, top : top + h, left : left + w]


def crop_tensor(image: torch.Tensor, params: CropParams, policy) -> torch.Tensor:
    """`crop_image` of a decoded (3, H, W) uint8 tensor, on its device (Pillow's resize arithmetic)."""
    out = resize_u8(cut_region(image, params.box), policy.input_size, policy.interpolation)
    return out.flip(-1) if params.flip else out


def resized_regions(regions: list[torch.Tensor], params: list[CropParams], policy) -> list[torch.Tensor]:
    """`crop_tensor` of many cut regions: the regions of one size resized together (one set of
    launches a size, not a crop), each then flipped if it drew a flip."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, region in enumerate(regions):
        by_size.setdefault(tuple(region.shape[-2:]), []).append(i)
    out: list[torch.Tensor] = [None] * len(regions)  # type: ignore[list-item]
    for group in by_size.values():
        resized = resize_u8(torch.stack([regions[i] for i in group]), policy.input_size, policy.interpolation)
        for k, i in enumerate(group):
            out[i] = resized[k].flip(-1) if params[i].flip else resized[k]
    return out
