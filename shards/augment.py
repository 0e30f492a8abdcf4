"""Seeded augmentation: the training crop is a pure function of (policy, image key, seed).

The teacher labels a crop once and every student run asks for the same crop again, so the
transform must give bit-identical tensors in any process. Two renderers implement DeiT's training
transform (RandomResizedCrop, flip, RandAugment, random erasing):

- `pil` (the default): timm's transform unchanged, made deterministic by running it under a
  per-sample seed derived with a stable hash, saving and restoring the caller's random state;
- `torch` (`render.py`): the same random choices drawn per sample on the CPU, the pixels rendered
  batched on any torch device in integer arithmetic, so a GPU node's CPUs do not set its pace and
  every device renders the same bytes. Its `decoder` is libjpeg (Pillow, where the loader runs)
  or nvjpeg (JPEGs decoded on the GPU): the two give different pixels.

The renderer and the decoder are part of the policy and of its id: each has its own label namespace.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from .crop import crop_image
from .decode import image_header
from .device_decode import check_device
from .params import check_padded_fits, draw_params, padded_crop_box, resized_crop_box
from .policy import IMAGENET_MEAN, IMAGENET_STD, AugmentPolicy, sample_seed
from .render import render_batch

__all__ = ["AugmentPolicy", "IMAGENET_MEAN", "IMAGENET_STD", "augment", "crop_box", "eval_transform", "eval_view",
           "cut_crop", "draw_for_device_decode", "sample_seed", "seeded_rng", "to_pil", "train_transform"]  # fmt: skip

# Python's `random`, numpy's and torch's global generators are process-wide: two threads
# augmenting at once would interleave draws. One lock keeps each augment call atomic.
_RNG_LOCK = threading.RLock()


def train_transform(policy: AugmentPolicy):
    """timm's training transform for `policy` (the pil renderer), built once per policy object."""
    if "train" not in policy._cache:
        from timm.data import create_transform

        transform = create_transform(
            input_size=policy.input_size,
            is_training=True,
            scale=policy.scale,
            ratio=policy.ratio,
            hflip=policy.hflip,
            color_jitter=policy.color_jitter,
            auto_augment=policy.auto_augment,
            interpolation=policy.interpolation,
            mean=policy.mean,
            std=policy.std,
            re_prob=policy.re_prob,
            re_mode=policy.re_mode,
            re_count=policy.re_count,
        )
        _posterize_any_bits_in(transform)
        if policy.crop == "padded":  # DeiT's datasets.build_transform at input_size <= 32
            from torchvision.transforms import RandomCrop

            transform.transforms[0] = RandomCrop(policy.input_size, padding=policy.crop_padding)
        policy._cache["train"] = transform
    return policy._cache["train"]


def eval_transform(policy: AugmentPolicy):
    """timm's evaluation transform for `policy`, built once per policy object."""
    if "eval" not in policy._cache:
        from timm.data import create_transform

        policy._cache["eval"] = create_transform(
            input_size=policy.input_size,
            is_training=False,
            interpolation=policy.interpolation,
            mean=policy.mean,
            std=policy.std,
            crop_pct=policy.eval_crop_pct,
        )
    return policy._cache["eval"]


def posterize_any_bits(img, bits_to_keep, **__):
    """timm's posterize, also for 0 bits (a black image, as Pillow < 13 gave).

    With DeiT's rand-m9-mstd0.5-inc1, magnitude noise reaches 10 and PosterizeIncreasing asks for
    0 bits; Pillow >= 13 rejects that with ValueError, which would silently drop ~0.2% of crops.
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _posterize_any_bits_in(transform) -> None:
    """Give the posterize ops of this transform's RandAugment `posterize_any_bits`: the fix stays in
    our transform, and timm's own op table (which the user's code may use) is left as timm has it."""
    for stage in getattr(transform, "transforms", ()):
        for op in getattr(stage, "ops", ()):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = posterize_any_bits


@contextlib.contextmanager
def seeded_rng(seed: int, restore: bool = True) -> Iterator[None]:
    """Run a block under `seed` for random, numpy and torch (CPU), restoring all three after.

    `restore=False` is for processes that do nothing but augment (the label engine's workers):
    nobody else draws from their generators, and saving and restoring the three states cost
    about a fifth of a 32 px crop. The crop is the same either way: every call seeds all three."""
    with _RNG_LOCK:
        if restore:
            py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(seed)
            np.random.seed(seed % (2**32))
            torch.random.default_generator.manual_seed(seed)
            yield
        finally:
            if restore:
                random.setstate(py_state)
                np.random.set_state(np_state)
                torch.set_rng_state(torch_state)


def augment(image: Image.Image, key: str, seed: int, policy: AugmentPolicy, restore_rng: bool = True) -> torch.Tensor:
    """The training crop for (policy, key, seed): a float tensor (3, H, W), bit-identical anywhere.
    The caller's random state is left as it was unless `restore_rng=False` (see `seeded_rng`).
    A torch policy renders the crop here, on the CPU, as a batch of one: the same tensor as in any
    batch on any device (`render.py`'s contract), and no global random state is touched."""
    if policy.renderer == "torch":
        check_device(policy, "cpu")
        crop, params = cut_crop(image, key, seed, policy)
        return render_batch(crop.unsqueeze(0), [params], policy, "cpu")[0]
    if policy.crop == "padded":  # refused in our words, not torchvision's (which names the padded size)
        check_padded_fits(image.width, image.height, policy.input_size, policy.crop_padding)
    transform = train_transform(policy)
    with seeded_rng(sample_seed(policy.policy_id, key, seed), restore_rng):
        out = transform(image)
    return out.contiguous()


def cut_crop(image: Image.Image, key: str, seed: int, policy: AugmentPolicy) -> tuple:
    """The CPU half of a torch-renderer crop from an image Pillow decoded: (its uint8 (3, S, S)
    crop: the box resized and flipped, its CropParams), for `render.render_batch` wherever the
    model runs."""
    params = draw_params(policy, sample_seed(policy.policy_id, key, seed), image.width, image.height)
    return crop_image(image, params, policy), params


def draw_for_device_decode(data: bytes, key: str, seed: int, policy: AugmentPolicy) -> tuple:
    """`cut_crop` for a JPEG decoded later, on the device (nvjpeg policies): (the bytes, the
    CropParams); reads only the header here (and refuses what `decode_image` would refuse from it)."""
    width, height = image_header(data)
    return data, draw_params(policy, sample_seed(policy.policy_id, key, seed), width, height)


def crop_box(policy: AugmentPolicy, key: str, seed: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The source box (top, left, height, width) of (policy, key, seed)'s training crop of a
    width x height image, without making the crop: the first draws from the sample seed, for either
    renderer (timm's RandomResizedCrop draws first from the seeded `random`, torchvision's
    RandomCrop from torch's generator; draw_params from its own `random`). A padded crop's box is
    the part of the image inside it."""
    sample = sample_seed(policy.policy_id, key, seed)
    if policy.crop == "padded":
        rng = _TorchDraws(sample) if policy.renderer == "pil" else random.Random(sample)
        return _inside(padded_crop_box(rng, width, height, policy.input_size, policy.crop_padding), width, height)
    return resized_crop_box(random.Random(sample), width, height, policy.scale, policy.ratio)


class _TorchDraws:
    """`random.Random.randint` drawn as torchvision's RandomCrop draws it, from a torch generator
    seeded as the pil renderer seeds torch."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def randint(self, a: int, b: int) -> int:
        return int(torch.randint(a, b + 1, size=(1,), generator=self.generator))


def _inside(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """The part of a box that lies inside a width x height image."""
    top, left, h, w = box
    bottom, right = min(top + h, height), min(left + w, width)
    top, left = max(top, 0), max(left, 0)
    return top, left, bottom - top, right - left


def eval_view(image: Image.Image, policy: AugmentPolicy) -> torch.Tensor:
    return eval_transform(policy)(image)


def to_pil(tensor: torch.Tensor, policy: AugmentPolicy) -> Image.Image:
    """Undo normalization of an augmented crop for display."""
    mean = torch.tensor(policy.mean).view(3, 1, 1)
    std = torch.tensor(policy.std).view(3, 1, 1)
    arr = ((tensor * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy())
