"""The augmentation policy: what a training crop is made of. At the bottom of `shards`: everything
that augments or renders imports it, and it imports nothing of the package but its flags.

- `AugmentPolicy`: DeiT's training augmentation, as timm's `create_transform` arguments plus the
  renderer and its decoder; its `policy_id` names it (and the code versions that implement it) in
  every label namespace.
- `RandAugmentSpec`: the policy's RandAugment string parsed once, typed (`policy.randaugment`).
- `OPS`: timm's "increasing" RandAugment ops, one mapping from each op to what implements it: its
  family in the torch renderer (`lut`, `blend`, `warp`), its code there, and timm's LEVEL_TO_ARG.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .flags import DECODERS, RENDERERS

# Bump when augment.py changes in a way that changes the produced tensors.
AUGMENT_CODE_VERSION = 2
# The same for the torch renderer (render.py, pixel_ops.py, resample.py); part of the id of torch
# policies only. 2: integer arithmetic on every device (Pillow's resize, fixed-point ops), the
# decoder in the policy; 3: the warps' weights in 11 bits (int32 sums)
RENDER_CODE_VERSION = 3

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROPS = ("resized", "padded")
# DeiT's datasets.build_transform: an input this size or smaller takes the padded crop and the whole
# image at eval, a larger one RandomResizedCrop and a center crop
SMALL_INPUT = 32
LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitudes are levels out of 10


# -- the ops --------------------------------------------------------------------------------


def _signed(rng: random.Random, v: float) -> float:
    """timm's _randomly_negate: the sign drawn where timm draws one."""
    return -v if rng.random() > 0.5 else v


def _none(level: float, rng: random.Random) -> float:
    return 0.0


@dataclass(frozen=True)
class Op:
    """One RandAugment op: its family and code in the torch renderer (`pixel_ops`), and timm's
    LEVEL_TO_ARG for it (`argument(level, rng)`, level = magnitude / 10)."""

    name: str
    family: str  # "lut" (a table per channel), "blend" (Pillow's ImageEnhance), "warp" (an affine transform)
    code: int  # its number within the family
    argument: Callable[[float, random.Random], float] = _none


_ENHANCE = lambda level, rng: max(0.1, 1.0 + _signed(rng, level * 0.9))  # noqa: E731
# timm's `_RAND_INCREASING_TRANSFORMS`, in timm's order (draws index into it)
OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("AutoContrast", "lut", 5),
        Op("Equalize", "lut", 6),
        Op("Invert", "lut", 1),
        Op("Rotate", "warp", 1, lambda level, rng: _signed(rng, level * 30.0)),
        Op("PosterizeIncreasing", "lut", 2, lambda level, rng: float(4 - int(level * 4))),
        Op("SolarizeIncreasing", "lut", 3, lambda level, rng: float(256 - min(256, int(level * 256)))),
        Op("SolarizeAdd", "lut", 4, lambda level, rng: float(min(128, int(level * 110)))),
        Op("ColorIncreasing", "blend", 2, _ENHANCE),
        Op("ContrastIncreasing", "blend", 3, _ENHANCE),
        Op("BrightnessIncreasing", "blend", 1, _ENHANCE),
        Op("SharpnessIncreasing", "blend", 4, _ENHANCE),
        Op("ShearX", "warp", 2, lambda level, rng: _signed(rng, level * 0.3)),
        Op("ShearY", "warp", 3, lambda level, rng: _signed(rng, level * 0.3)),
        Op("TranslateXRel", "warp", 4, lambda level, rng: _signed(rng, level * 0.45)),
        Op("TranslateYRel", "warp", 5, lambda level, rng: _signed(rng, level * 0.45)),
    )
}
INCREASING_OPS = tuple(OPS)


def family(name: str) -> tuple[str, ...]:
    """The ops of a family, in OPS's order."""
    return tuple(op.name for op in OPS.values() if op.family == name)


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm RandAugment string, for the subset the torch renderer implements."""

    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: float = LEVEL_DENOM

    @classmethod
    @functools.lru_cache(maxsize=64)
    def parse(cls, text: str) -> RandAugmentSpec:
        parts = text.split("-")
        if parts[0] != "rand":
            raise ValueError(f"the torch renderer implements RandAugment ('rand-...'), not {text!r}")
        fields = {"m": ("magnitude", float), "n": ("num_layers", int), "p": ("prob", float),
                  "mstd": ("magnitude_std", float), "mmax": ("magnitude_max", float)}  # fmt: skip
        kw: dict = {}
        increasing = False
        for part in parts[1:]:
            match = re.fullmatch(r"([a-z]+)([\d.]+)", part)
            if match is None:
                raise ValueError(f"cannot read {part!r} in {text!r}")
            name, value = match.groups()
            if name == "inc":
                increasing = bool(int(value))
            elif name in fields:
                key, kind = fields[name]
                kw[key] = kind(value)
            else:
                raise ValueError(f"the torch renderer does not implement {part!r} of {text!r}")
        if not increasing:
            raise ValueError(f"the torch renderer implements timm's increasing op set only (add '-inc1' to {text!r})")
        if kw.get("magnitude_std", 0.0) > 100:
            raise ValueError("uniform magnitude sampling (mstd > 100) is not implemented by the torch renderer")
        return cls(**kw)


# -- the policy -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentPolicy:
    """DeiT's training augmentation (timm `create_transform(is_training=True)` arguments)."""

    input_size: int = 224
    # "resized": timm's RandomResizedCrop (scale, ratio); "padded": what DeiT's code puts in its place
    # at input_size <= 32 (CIFAR's recipe): RandomCrop(input_size, padding=crop_padding), no resize
    crop: str = "resized"
    crop_padding: int = 4
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
    # what is derived once per policy object: its id, its parsed spec, timm's transforms (augment.py)
    _cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.renderer not in RENDERERS:
            raise ValueError(f"renderer must be one of {RENDERERS}, not {self.renderer!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, not {self.decoder!r}")
        if self.renderer == "pil" and self.decoder != "libjpeg":
            raise ValueError(
                f"the pil renderer decodes with Pillow (libjpeg); decoder {self.decoder!r} needs renderer torch"
            )
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, not {self.crop!r}")
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, not {self.crop_padding}")
        if self.renderer == "torch":  # what the torch renderer implements
            if self.interpolation not in ("bicubic", "bilinear"):
                raise ValueError(f"the torch renderer resizes with bicubic or bilinear, not {self.interpolation!r}")
            if self.re_mode not in ("pixel", "const"):
                raise ValueError(f"the torch renderer erases in 'pixel' or 'const' mode, not {self.re_mode!r}")
            if not self.auto_augment and self.color_jitter:
                raise ValueError("the torch renderer does not implement color jitter (timm skips it under RandAugment)")
            _ = self.randaugment  # parsed (and refused) now, not at the first crop

    @property
    def randaugment(self) -> RandAugmentSpec | None:
        """The RandAugment string, parsed once (None without RandAugment)."""
        if "randaugment" not in self._cache:
            self._cache["randaugment"] = RandAugmentSpec.parse(self.auto_augment) if self.auto_augment else None
        return self._cache["randaugment"]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("_cache")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> AugmentPolicy:
        names = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown augmentation policy fields: {sorted(unknown)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AugmentPolicy:
        return cls.from_dict(json.loads(text))

    @property
    def policy_id(self) -> str:
        """Digest of the parameters and of the code versions that implement them."""
        if "id" not in self._cache:
            params = self.to_dict()
            decoder = params.pop("decoder")
            if params["crop"] == "resized":  # ids of resized-crop policies stay what they were before `crop`
                del params["crop"], params["crop_padding"]
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
            self._cache["id"] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
        return self._cache["id"]


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
