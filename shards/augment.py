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
import dataclasses
import hashlib
import importlib.metadata
import json
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .decode import image_header
from .flags import RENDERERS
from .render import DECODERS, check_device, crop_image, draw_params, render_batch

# Bump when this module changes in a way that changes the produced tensors.
AUGMENT_CODE_VERSION = 2
# The same for the torch renderer (render.py, resample.py); part of the id of torch policies only.
# 2: integer arithmetic on every device (Pillow's resize, fixed-point ops), the decoder in the policy;
# 3: the warps' weights in 11 bits (int32 sums)
RENDER_CODE_VERSION = 3

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Python's `random`, numpy's and torch's global generators are process-wide: two threads
# augmenting at once would interleave draws. One lock keeps each augment call atomic.
_RNG_LOCK = threading.RLock()


@dataclass(frozen=True)
class AugmentPolicy:
    """DeiT's training augmentation (timm `create_transform(is_training=True)` arguments)."""

    input_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.3
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Eval transform: resize to input_size / crop_pct, then center crop.
    eval_crop_pct: float = 0.875
    # "pil": timm's transform on the CPU; "torch": parameters on the CPU, pixels on any device
    renderer: str = "pil"
    # torch renderer: "libjpeg" (Pillow decodes where the loader runs) or "nvjpeg" (JPEGs decoded
    # on the CUDA device that renders); the pil renderer decodes with Pillow
    decoder: str = "libjpeg"
    _transform_cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("_transform_cache")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> AugmentPolicy:
        names = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown augmentation policy fields: {sorted(unknown)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def __post_init__(self):
        if self.renderer not in RENDERERS:
            raise ValueError(f"renderer must be one of {RENDERERS}, not {self.renderer!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, not {self.decoder!r}")
        if self.renderer == "pil" and self.decoder != "libjpeg":
            raise ValueError(
                f"the pil renderer decodes with Pillow (libjpeg); decoder {self.decoder!r} needs renderer torch"
            )
        if self.renderer == "torch":
            from .render import check_policy

            check_policy(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AugmentPolicy:
        return cls.from_dict(json.loads(text))

    @property
    def policy_id(self) -> str:
        """Digest of the parameters and of the code versions that implement them."""
        if "id" in self._transform_cache:
            return self._transform_cache["id"]
        params = self.to_dict()
        decoder = params.pop("decoder")
        if params.pop("renderer") != "pil":  # ids of pil policies stay what they were before renderers
            params["renderer"] = self.renderer
            params["decoder"] = decoder
            params["render_code"] = RENDER_CODE_VERSION
        payload = {
            "params": params,
            "augment_code": AUGMENT_CODE_VERSION,
            "timm": _version("timm"),
            "torchvision": _version("torchvision"),
            "pillow": _version("pillow"),
        }
        blob = json.dumps(payload, sort_keys=True).encode()
        self._transform_cache["id"] = hashlib.sha256(blob).hexdigest()[:16]
        return self._transform_cache["id"]

    def train_transform(self):
        if "train" not in self._transform_cache:
            from timm.data import create_transform

            _patch_timm_posterize()
            self._transform_cache["train"] = create_transform(
                input_size=self.input_size,
                is_training=True,
                scale=self.scale,
                ratio=self.ratio,
                hflip=self.hflip,
                color_jitter=self.color_jitter,
                auto_augment=self.auto_augment,
                interpolation=self.interpolation,
                mean=self.mean,
                std=self.std,
                re_prob=self.re_prob,
                re_mode=self.re_mode,
                re_count=self.re_count,
            )
        return self._transform_cache["train"]

    def eval_transform(self):
        if "eval" not in self._transform_cache:
            from timm.data import create_transform

            self._transform_cache["eval"] = create_transform(
                input_size=self.input_size,
                is_training=False,
                interpolation=self.interpolation,
                mean=self.mean,
                std=self.std,
                crop_pct=self.eval_crop_pct,
            )
        return self._transform_cache["eval"]


def _posterize_any_bits(img, bits_to_keep, **__):
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


def _patch_timm_posterize() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize_any_bits


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "absent"


def sample_seed(policy_id: str, key: str, seed: int) -> int:
    """Stable 63-bit seed for one (policy, key, seed); never Python's salted hash()."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    digest = hashlib.sha256(f"{policy_id}\x00{key}\x00{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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
        crop, params = prepare(image, key, seed, policy)
        return render_batch(crop.unsqueeze(0), [params], policy, "cpu")[0]
    transform = policy.train_transform()
    with seeded_rng(sample_seed(policy.policy_id, key, seed), restore_rng):
        out = transform(image)
    return out.contiguous()


def prepare(image: Image.Image, key: str, seed: int, policy: AugmentPolicy) -> tuple:
    """The CPU half of a torch-renderer crop from an image Pillow decoded: (its uint8 (3, S, S)
    crop: the box resized and flipped, its CropParams), for `render.render_batch` wherever the
    model runs."""
    params = draw_params(policy, sample_seed(policy.policy_id, key, seed), image.width, image.height)
    return crop_image(image, params, policy), params


def prepare_encoded(data: bytes, key: str, seed: int, policy: AugmentPolicy) -> tuple:
    """`prepare` for a JPEG decoded later, on the device (nvjpeg policies): (the bytes, the
    CropParams); reads only the header here (and refuses what `decode_image` would refuse from it)."""
    width, height = image_header(data)
    return data, draw_params(policy, sample_seed(policy.policy_id, key, seed), width, height)


def eval_view(image: Image.Image, policy: AugmentPolicy) -> torch.Tensor:
    return policy.eval_transform()(image)


def to_pil(tensor: torch.Tensor, policy: AugmentPolicy) -> Image.Image:
    """Undo normalization of an augmented crop for display."""
    mean = torch.tensor(policy.mean).view(3, 1, 1)
    std = torch.tensor(policy.std).view(3, 1, 1)
    arr = ((tensor * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy())
