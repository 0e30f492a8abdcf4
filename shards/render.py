"""The torch renderer: DeiT's training crop drawn on the CPU, rendered batched on any torch device,
the same bytes on every device.

`AugmentPolicy(renderer="torch")` splits the crop in three:

- **Parameters**, drawn per sample on the CPU from the sample's seed (`draw_params`): the
  RandomResizedCrop box, the flip, RandAugment's ops with timm's semantics (n ops chosen with
  replacement from the "increasing" set, each applied with probability p, magnitude from N(m, mstd)
  clipped to [0, 10], random sign where timm negates), random erasing's boxes and a key for its
  noise. Microseconds a sample; they need only the image's size.
- **The crop** (`crop_image`, `crop_tensor`): the box cut out of the decoded image, resized to
  S x S with Pillow's antialiased filter, flipped: a uint8 (3, S, S). The decoder is part of the
  policy (`decoder`): `libjpeg` decodes with Pillow where the loader runs and resizes with Pillow
  (timm's own RandomResizedCrop); `nvjpeg` decodes JPEGs on the GPU and resizes there with
  Pillow's arithmetic (`resample.py`).
- **The pixels** (`render_batch`), for a whole batch on the device where the model runs: the
  RandAugment ops in their drawn order (each op on the samples that drew it, with per-sample
  arguments), normalisation and erasing.

Exactness: a crop is a function of (policy, key, seed) only, not of its batch, its position in it,
the process, the thread count or the device. Every op works on uint8 pixels in **integer
arithmetic** (fixed-point blends, warps with fixed-point coordinates and a fixed interpolation
table, integer histograms and means), so there is no float result that a device could round
differently: the same uint8 crop comes out on the CPU and on CUDA, bit for bit. The only floats
are read, never computed, on the device: normalisation is a lookup in a 3 x 256 table and
erasing noise a counter-based hash of (sample key, pixel) looked up in an inverse-normal table,
both built once on the CPU. (`tests/test_render.py` records every operation the render runs and
fails on any floating-point arithmetic.) Pointwise ops give Pillow's bytes, or differ by a level
where Pillow's float arithmetic lands on the other side of an integer; the warps are Pillow's
transform (its cubic, its edge and fill rules) in fixed point, within a level or two of Pillow.
The render is never compiled: a compiler fusing kernels is free to reorder nothing here, but it is
not needed either.
"""

from __future__ import annotations

import functools
import io
import math
import random
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .flags import DECODERS
from .resample import resize_u8

PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

# The "increasing" RandAugment set of timm (`_RAND_INCREASING_TRANSFORMS`), in timm's order.
INCREASING_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
GEOMETRIC_OPS = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
_LEVEL_DENOM = 10.0


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm RandAugment string, for the subset the torch renderer implements."""

    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: float = _LEVEL_DENOM

    @classmethod
    @functools.lru_cache(maxsize=64)
    def parse(cls, text: str) -> RandAugmentSpec:
        parts = text.split("-")
        if parts[0] != "rand":
            raise ValueError(f"the torch renderer implements RandAugment ('rand-...'), not {text!r}")
        kw: dict = {}
        increasing = False
        for part in parts[1:]:
            match = re.fullmatch(r"([a-z]+)([\d.]+)", part)
            if match is None:
                raise ValueError(f"cannot read {part!r} in {text!r}")
            name, value = match.groups()
            if name == "m":
                kw["magnitude"] = float(value)
            elif name == "n":
                kw["num_layers"] = int(value)
            elif name == "p":
                kw["prob"] = float(value)
            elif name == "mstd":
                kw["magnitude_std"] = float(value)
            elif name == "mmax":
                kw["magnitude_max"] = float(value)
            elif name == "inc":
                increasing = bool(int(value))
            else:
                raise ValueError(f"the torch renderer does not implement {part!r} of {text!r}")
        if not increasing:
            raise ValueError(f"the torch renderer implements timm's increasing op set only (add '-inc1' to {text!r})")
        if kw.get("magnitude_std", 0.0) > 100:
            raise ValueError("uniform magnitude sampling (mstd > 100) is not implemented by the torch renderer")
        return cls(**kw)


@dataclass(frozen=True)
class CropParams:
    """Everything random about one crop; `box` is (top, left, height, width) in the source image,
    `ops` the RandAugment ops applied, in order, with their argument, `erase` boxes in the crop."""

    box: tuple[int, int, int, int]
    flip: bool
    ops: tuple[tuple[str, float], ...]
    erase: tuple[tuple[int, int, int, int], ...]
    noise_key: int


def check_policy(policy) -> RandAugmentSpec | None:
    """Refuse, with a reason, a policy the torch renderer cannot render."""
    if policy.decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, not {policy.decoder!r}")
    if policy.interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"the torch renderer resizes with bicubic or bilinear, not {policy.interpolation!r}")
    if policy.re_mode not in ("pixel", "const"):
        raise ValueError(f"the torch renderer erases in 'pixel' or 'const' mode, not {policy.re_mode!r}")
    if not policy.auto_augment and policy.color_jitter:
        raise ValueError("the torch renderer does not implement color jitter (timm skips it under RandAugment)")
    return RandAugmentSpec.parse(policy.auto_augment) if policy.auto_augment else None


def draw_params(policy, sample_seed: int, width: int, height: int) -> CropParams:
    """The random choices of one crop, from its sample seed and its image's size (timm's order)."""
    rng = random.Random(sample_seed)
    box = _resized_crop_box(rng, width, height, policy.scale, policy.ratio)
    flip = rng.random() < policy.hflip
    spec = check_policy(policy)
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
            ops.append((name, _op_argument(name, m, rng)))
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


def _resized_crop_box(rng: random.Random, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
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


def _op_argument(name: str, m: float, rng: random.Random) -> float:
    """timm's LEVEL_TO_ARG for the increasing set; the sign is drawn where timm draws one."""
    level = m / _LEVEL_DENOM

    def negate(v: float) -> float:
        return -v if rng.random() > 0.5 else v

    if name == "Rotate":
        return negate(level * 30.0)
    if name == "PosterizeIncreasing":
        return float(4 - int(level * 4))
    if name == "SolarizeIncreasing":
        return float(256 - min(256, int(level * 256)))
    if name == "SolarizeAdd":
        return float(min(128, int(level * 110)))
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return max(0.1, 1.0 + negate(level * 0.9))
    if name in ("ShearX", "ShearY"):
        return negate(level * 0.3)
    if name in ("TranslateXRel", "TranslateYRel"):
        return negate(level * 0.45)
    return 0.0  # AutoContrast, Equalize, Invert take no argument


# -- the crop: the box, resized to S x S, flipped -------------------------------------------


def to_uint8_chw(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a contiguous (3, H, W) uint8 tensor."""
    arr = np.asarray(image.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def crop_image(image: Image.Image, params: CropParams, policy) -> torch.Tensor:
    """timm's RandomResizedCrop and flip of a Pillow image under `params`: Pillow's crop, resize and
    transpose (the pil renderer's first two steps), as a uint8 (3, S, S)."""
    top, left, h, w = params.box
    size = policy.input_size
    out = image.crop((left, top, left + w, top + h)).resize((size, size), PIL_FILTERS[policy.interpolation])
    if params.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_uint8_chw(out)


def crop_tensor(image: torch.Tensor, params: CropParams, policy) -> torch.Tensor:
    """`crop_image` of a decoded (3, H, W) uint8 tensor, on its device (Pillow's resize arithmetic)."""
    top, left, h, w = params.box
    out = resize_u8(image[:, top : top + h, left : left + w], policy.input_size, policy.interpolation)
    return out.flip(-1) if params.flip else out


# -- decoding on the device ------------------------------------------------------------------


def check_device(policy, device) -> None:
    """A policy that decodes with nvJPEG renders on a CUDA device only: a clear error elsewhere."""
    device = torch.device(device)
    if getattr(policy, "decoder", "libjpeg") == "nvjpeg" and device.type != "cuda":
        where = "this machine has no CUDA device" if not torch.cuda.is_available() else f"it was asked for {device}"
        raise ValueError(
            f"the augmentation policy decodes JPEGs with nvJPEG, which runs on a CUDA device, and {where}; "
            "labels made with nvJPEG pixels can only be used where nvJPEG decodes (or precompute labels with "
            "decoder libjpeg)"
        )


def decode_on_device(datas: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """JPEGs decoded on `device` in one batched call (nvJPEG on CUDA, libjpeg-turbo on the CPU):
    TorchCodec's decoder where it is installed (the kept path), torchvision's otherwise."""
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        from torchcodec.decoders import decode_jpeg
    except ImportError:
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    return decode_jpeg(tensors, mode="RGB", device=device)


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def crops_on_device(items: list[tuple], policy, device) -> torch.Tensor:
    """The uint8 (B, 3, S, S) crops of prepared items on `device`: (uint8 crop, params) as they
    are, (JPEG bytes, params) decoded there in one batched call, then cut and resized there."""
    device = torch.device(device)
    sources = [source for source, _ in items]
    encoded = [i for i, source in enumerate(sources) if isinstance(source, bytes | bytearray)]
    if encoded:
        check_device(policy, device)
        try:
            images = decode_on_device([sources[i] for i in encoded], device)
        except Exception:  # e.g. a CMYK JPEG nvJPEG refuses: one at a time, with Pillow if need be
            images = [_decode_one(sources[i], device) for i in encoded]
        for i, image in zip(encoded, images, strict=True):
            sources[i] = crop_tensor(image, items[i][1], policy)
    return torch.stack([s.to(device, non_blocking=True) for s in sources])


def _decode_one(data: bytes, device: torch.device) -> torch.Tensor:
    try:
        return decode_on_device([data], device)[0]
    except Exception:
        with Image.open(io.BytesIO(data)) as im:
            return to_uint8_chw(im).to(device)


def render_prepared(items: list[tuple], policy, device) -> torch.Tensor:
    """`render_batch` of prepared items (see `crops_on_device`)."""
    return render_batch(crops_on_device(items, policy, device), [p for _, p in items], policy, device)


# -- the pixels ----------------------------------------------------------------------------


def render_batch(crops, params: list[CropParams], policy, device=None, timings: dict | None = None) -> torch.Tensor:
    """The normalised crops (B, 3, S, S) float32 of uint8 `crops` ((B, 3, S, S), or a list of
    (3, S, S), on any device) under `params`, rendered on `device` (default: the crops').
    `timings`, for benchmarks: seconds per stage are added to it (with a device sync per stage)."""
    if isinstance(crops, list | tuple):
        if not crops:
            raise ValueError("render_batch needs at least one crop")
        crops = torch.stack(list(crops))
    device = torch.device(device) if device is not None else crops.device
    if device.type == "cpu" and len(crops) > 1:
        # a crop at a time: the same bytes (a crop never depends on its batch), and on a CPU the
        # working set of one crop stays in its caches where a batch's int64 temporaries do not
        one = [render_batch(crops[i : i + 1], params[i : i + 1], policy, device, timings) for i in range(len(crops))]
        return torch.cat(one)
    stage = _StageClock(timings, device)
    x = randaugment(crops.to(device, non_blocking=True), params, policy)
    stage("randaugment")
    return normalize_and_erase(x, params, policy, stage)


def randaugment(x: torch.Tensor, params: list[CropParams], policy) -> torch.Tensor:
    """The RandAugment ops of each sample, in its drawn order, on uint8 (B, 3, S, S): uint8 out."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[0] != len(params):
        raise ValueError(f"randaugment takes one uint8 (3, S, S) crop per params, got {tuple(x.shape)} {x.dtype}")
    x = x.clone()
    fill = fill_color(policy)
    depth = max((len(p.ops) for p in params), default=0)
    for layer in range(depth):
        groups: dict[str, tuple[list[int], list[float]]] = {}
        for i, p in enumerate(params):
            if layer < len(p.ops):
                name, arg = p.ops[layer]
                rows, args = groups.setdefault(name, ([], []))
                rows.append(i)
                args.append(arg)
        for name, (rows, args) in groups.items():
            idx = torch.tensor(rows, device=x.device)
            x[idx] = apply_op(name, x[idx], args, fill, policy.interpolation)
    return x


def fill_color(policy) -> tuple[int, int, int]:
    """timm's fill for the geometric ops: the mean colour in 0..255."""
    return tuple(min(255, round(255 * m)) for m in policy.mean)


def normalize_and_erase(x: torch.Tensor, params: list[CropParams], policy, stage=None) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> timm's ToTensor + Normalize (looked up, not computed), then erasing."""
    table = _normal_lut(tuple(policy.mean), tuple(policy.std), x.device).view(3, 256)
    flat = x.to(torch.int64).transpose(0, 1).reshape(3, -1)  # (3, B*S*S) levels
    out = torch.stack([table[c].index_select(0, flat[c]) for c in range(3)]).view(3, x.shape[0], *x.shape[2:])
    out = out.transpose(0, 1).contiguous()
    if stage is not None:
        stage("normalize")
    for i, p in enumerate(params):
        for top, left, h, w in p.erase:
            if policy.re_mode == "pixel":
                out[i, :, top : top + h, left : left + w] = hash_normal(p.noise_key, (3, h, w), x.device)
            else:
                out[i, :, top : top + h, left : left + w] = 0.0
    if stage is not None:
        stage("erase")
    return out


@functools.cache
def _normal_lut(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(3 * 256,) float32: level v of channel c at [256 c + v], as timm computes it on the CPU
    (ToTensor's v / 255, then Normalize's (x - mean) / std, in float32)."""
    levels = torch.arange(256, dtype=torch.float32).div(255).expand(3, 256)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1)
    return levels.sub(m).div(s).reshape(-1).to(device)


class _StageClock:
    """Adds each stage's seconds to a dict (with a device sync); does nothing without one."""

    def __init__(self, timings: dict | None, device: torch.device):
        self.timings, self.device = timings, device
        self.last = self._now() if timings is not None else 0.0

    def _now(self) -> float:
        import time

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.timings is not None:
            now = self._now()
            self.timings[name] = self.timings.get(name, 0.0) + now - self.last
            self.last = now


# -- the RandAugment ops, uint8 in and out, integer arithmetic ------------------------------


def _per_sample(values, like: torch.Tensor, dtype=torch.int64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=like.device).view(-1, 1, 1, 1)


def apply_op(name: str, x: torch.Tensor, args: list[float], fill=(124, 116, 104), interpolation="bicubic"):
    """One RandAugment op on uint8 samples `x` (n, 3, S, S), one argument each: uint8 out."""
    if name in GEOMETRIC_OPS:
        return _warp(x, name, args, fill, interpolation)
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Invert":
        return 255 - x
    if name == "PosterizeIncreasing":  # keep the top `bits` bits; 0 bits: black
        masks = [(0xFF << (8 - int(bits))) & 0xFF if int(bits) < 8 else 0xFF for bits in args]
        return x & _per_sample(masks, x, torch.uint8)
    xi = x.to(torch.int32)
    if name == "SolarizeIncreasing":
        return torch.where(xi < _per_sample([int(a) for a in args], x, torch.int32), xi, 255 - xi).to(torch.uint8)
    if name == "SolarizeAdd":
        added = (xi + _per_sample([int(a) for a in args], x, torch.int32)).clamp_(max=255)
        return torch.where(xi < 128, added, xi).to(torch.uint8)
    if name == "BrightnessIncreasing":
        degenerate = torch.zeros_like(xi)
    elif name == "ColorIncreasing":
        degenerate = _luma(xi).expand_as(xi)
    elif name == "ContrastIncreasing":
        luma = _luma(xi).to(torch.int64)
        n = luma[0].numel()
        mean = (2 * luma.sum(dim=(1, 2, 3)) + n) // (2 * n)  # Pillow's int(mean + 0.5), exactly
        degenerate = mean.view(-1, 1, 1, 1).expand_as(xi)
    elif name == "SharpnessIncreasing":
        degenerate = _smooth(xi)
    else:  # pragma: no cover - the op list and this function are kept together
        raise ValueError(f"unknown op {name}")
    return _blend(degenerate, xi, args)


_BLEND_BITS = 32


def _blend(a: torch.Tensor, b: torch.Tensor, factors: list[float]) -> torch.Tensor:
    """Pillow's Image.blend(a, b, f) = a + f (b - a), truncated and clipped, with Pillow's float32
    factor exactly in 32-bit fixed point (a float32 >= 2^-8 is a multiple of 2^-31), F = f 2^32:
    floor(F d / 2^32) in int32 as floor((Fh d + floor(Fl d / 2^16)) / 2^16), F = Fh 2^16 + Fl.
    Pillow rounds its float32 product and sum, so it lands a level higher where the exact value
    falls just short of an integer."""
    f = [round(float(np.float32(v)) * (1 << _BLEND_BITS)) for v in factors]
    high = _per_sample([v >> 16 for v in f], a, torch.int32)
    low = _per_sample([v & 0xFFFF for v in f], a, torch.int32)
    a = a.to(torch.int32)
    d = b.to(torch.int32) - a
    out = a + ((d * high + ((d * low) >> 16)) >> 16)
    return out.clamp_(0, 255).to(torch.uint8)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L conversion: (19595 R + 38470 G + 7471 B + 2^15) >> 16, as (n, 1, H, W)."""
    return (x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 32768) >> 16


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Pillow's ImageOps.autocontrast per channel: (v - lo) * 255 / (hi - lo), truncated; a table
    of the 256 levels per channel, then a lookup."""
    n, c = x.shape[:2]
    lo = x.amin(dim=(2, 3)).to(torch.int32).view(n * c, 1)
    hi = x.amax(dim=(2, 3)).to(torch.int32).view(n * c, 1)
    levels = torch.arange(256, dtype=torch.int32, device=x.device).view(1, 256)
    flat = hi <= lo
    lut = ((levels - lo) * 255).div_(torch.where(flat, 1, hi - lo), rounding_mode="floor").clamp_(0, 255)
    return _lookup(torch.where(flat, levels, lut).to(torch.uint8), x)


def _lookup(lut: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`lut` (n * c, 256) uint8 applied to uint8 x (n, c, H, W): each channel its own table."""
    n, c = x.shape[:2]
    return lut.gather(1, x.reshape(n * c, -1).to(torch.int64)).view(x.shape)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Pillow's ImageOps.equalize per channel, in integers (histograms by scatter_add: no sync)."""
    n, c = x.shape[:2]
    xi = x.to(torch.int64).reshape(n * c, -1)
    offsets = torch.arange(n * c, device=x.device).view(-1, 1) * 256
    hist = torch.zeros(n * c * 256, dtype=torch.int64, device=x.device)
    ones = torch.ones(1, dtype=torch.int64, device=x.device).expand(xi.numel())
    hist.scatter_add_(0, (xi + offsets).reshape(-1), ones)
    hist = hist.view(n * c, 256)
    levels = torch.arange(256, device=x.device)
    present = hist > 0
    last = (levels * present).amax(dim=1, keepdim=True)
    step = (hist.sum(dim=1, keepdim=True) - hist.gather(1, last)) // 255
    identity = (present.sum(dim=1, keepdim=True) <= 1) | (step == 0)
    safe = torch.where(identity, torch.ones_like(step), step)
    lut = ((safe // 2 + hist.cumsum(dim=1) - hist) // safe).clamp_(max=255)
    lut = torch.where(identity, levels.expand_as(lut), lut)
    return lut.to(torch.uint8).gather(1, xi).view(x.shape)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """Pillow's ImageFilter.SMOOTH (3x3, centre 5, the rest 1, divided by 13, rounded) in
    integers; the border keeps the original pixels, as Pillow's filter does."""
    out = x.clone()
    h, w = x.shape[-2:]
    acc = x[..., 1 : h - 1, 1 : w - 1] * 5
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if (dy, dx) != (1, 1):
                acc = acc + x[..., dy : h - 2 + dy, dx : w - 2 + dx]
    out[..., 1 : h - 1, 1 : w - 1] = _thirteenths(x.device).index_select(0, acc.reshape(-1)).view(acc.shape)
    return out


@functools.cache
def _thirteenths(device: torch.device) -> torch.Tensor:
    """floor(acc / 13 + 1/2) for acc in 0 .. 13 * 255: the smoothing's division as a lookup."""
    return ((2 * torch.arange(13 * 255 + 1, dtype=torch.int32) + 13) // 26).to(device)


# -- the geometric ops: Pillow's affine transform in fixed point ----------------------------

_COORD_BITS = 32  # fractional bits of the transform's coefficients
_TABLE_BITS = 12  # the interpolation table holds 2^12 + 1 fractional positions in [0, 1]
# its weights, in fixed point: 11 bits keep the sum of 16 taps' products in int32 (Pillow's cubic
# reaches 1.25 over its positive taps and -0.25 over its negative ones: 255 x 1.25^2 x 2^22 < 2^31)
_WEIGHT_BITS = 11


def _affine(name: str, v: float, w: int, h: int) -> tuple[float, ...]:
    """Pillow's (a, b, c, d, e, f) for timm's op with argument `v` on a w x h image: output pixel
    centre (x, y) reads input (a x + b y + c, d x + e y + f). Rotate is Pillow's `rotate` matrix,
    computed as Pillow computes it."""
    if name == "Rotate":
        angle = -math.radians(v % 360.0)
        cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
        cx, cy = w / 2, h / 2
        c = cos * -cx + sin * -cy + 0.0
        f = -sin * -cx + cos * -cy + 0.0
        return cos, sin, c + cx, -sin, cos, f + cy
    if name == "ShearX":
        return 1.0, v, 0.0, 0.0, 1.0, 0.0
    if name == "ShearY":
        return 1.0, 0.0, 0.0, v, 1.0, 0.0
    if name == "TranslateXRel":
        return 1.0, 0.0, v * w, 0.0, 1.0, 0.0
    return 1.0, 0.0, 0.0, 0.0, 1.0, v * h  # TranslateYRel


@functools.cache
def _interpolation_table(interpolation: str) -> tuple[tuple[int, ...], np.ndarray]:
    """(tap offsets, weights (2^T + 1, taps) int64 summing to 2^W) of Pillow's transform filter at
    fractional position d = i / 2^T: its bicubic (a = -1, as its BICUBIC macro) or bilinear."""
    d = np.arange((1 << _TABLE_BITS) + 1) / (1 << _TABLE_BITS)
    if interpolation == "bicubic":
        offsets = (-1, 0, 1, 2)
        w = np.stack([-d + 2 * d**2 - d**3, 1 - 2 * d**2 + d**3, d + d**2 - d**3, -(d**2) + d**3], axis=1)
    else:
        offsets = (0, 1)
        w = np.stack([1 - d, d], axis=1)
    fixed = np.round(w * (1 << _WEIGHT_BITS)).astype(np.int64)
    largest = np.abs(fixed).argmax(axis=1)  # so that a flat area stays flat: each row sums to 2^W
    fixed[np.arange(len(d)), largest] += (1 << _WEIGHT_BITS) - fixed.sum(axis=1)
    return offsets, fixed


def _warp(x: torch.Tensor, name: str, args: list[float], fill, interpolation: str) -> torch.Tensor:
    """Pillow's affine transform of each sample (timm's Rotate, Shear, Translate): an output pixel
    whose source lies outside the image gets the fill colour; inside, the filter's taps are clamped
    to the image's edge and the result truncated, as Pillow's. Coordinates in 32-bit fixed point,
    the filter read from a table, the taps summed along each row, then down the column: integers
    throughout (int32 but for the coordinates)."""
    n, c, h, w = x.shape
    one = 1 << _COORD_BITS
    coeffs = []
    for v in args:
        a, b, cc, d, e, f = _affine(name, v, w, h)
        # source = a (xo + 1/2) + b (yo + 1/2) + c: scaled by 2^(bits + 1), over (2 xo + 1)
        coeffs.append([round(a * one), round(b * one), round(cc * 2 * one), round(d * one), round(e * one),
                       round(f * 2 * one)])  # fmt: skip
    m = torch.tensor(coeffs, dtype=torch.int64, device=x.device).view(n, 6, 1, 1)
    xo = (2 * torch.arange(w, device=x.device) + 1).view(1, 1, w)
    yo = (2 * torch.arange(h, device=x.device) + 1).view(1, h, 1)
    sx = m[:, 0] * xo + (m[:, 1] * yo + m[:, 2])  # (n, h, w), source x times 2^(bits + 1)
    sy = m[:, 3] * xo + (m[:, 4] * yo + m[:, 5])
    scale = 2 * one
    inside = (sx >= 0) & (sx < w * scale) & (sy >= 0) & (sy < h * scale)
    offsets, table = _interpolation_table(interpolation)
    table = torch.from_numpy(table).to(device=x.device, dtype=torch.int32)
    shift = _COORD_BITS + 1 - _TABLE_BITS

    def taps(s: torch.Tensor, size: int):
        s = s - one  # the filter works on pixel centres: source - 1/2
        i = s >> (_COORD_BITS + 1)  # floor
        frac = s - (i << (_COORD_BITS + 1))
        t = (frac + (1 << (shift - 1))) >> shift  # nearest table entry, 0 .. 2^T
        weights = table[t].view(-1, len(offsets)).T.contiguous()  # (taps, n h w)
        return [(i + o).clamp_(0, size - 1).view(-1) for o in offsets], weights

    cols, wx = taps(sx, w)  # per output pixel: its taps' columns and (taps, n h w) weights
    rows, wy = taps(sy, h)
    planes = x.transpose(0, 1).reshape(-1)  # channel by channel, each sample's pixels in turn
    size = n * h * w
    base = (torch.arange(c, device=x.device).view(c, 1) * size) + (
        torch.arange(n, device=x.device) * (h * w)
    ).repeat_interleave(h * w)  # (c, n h w): where a channel's pixel of a sample starts
    acc = torch.zeros((c, size), dtype=torch.int32, device=x.device)
    for j, row in enumerate(rows):
        start = base + row * w
        line = torch.zeros_like(acc)
        for k, col in enumerate(cols):  # along the row
            line += planes.take(start + col).to(torch.int32) * wx[k]
        acc += line * wy[j]  # down the column
    value = (acc >> (2 * _WEIGHT_BITS)).clamp_(0, 255).to(torch.uint8)
    value = value.view(c, n, h, w).transpose(0, 1)
    fill = torch.tensor(fill, dtype=torch.uint8, device=x.device).view(1, c, 1, 1)
    return torch.where(inside.unsqueeze(1), value, fill).contiguous()


# -- erasing noise: a counter-based hash, the same on every device -------------------------

_MASK32 = 0xFFFFFFFF
_NORMAL_BITS = 16
_normal_tables: dict[torch.device, torch.Tensor] = {}


def _normal_table(device: torch.device) -> torch.Tensor:
    """Inverse normal CDF at the centres of 2^16 equal bins: float32, computed once in float64."""
    if device not in _normal_tables:
        from statistics import NormalDist

        n = 1 << _NORMAL_BITS
        inv = NormalDist().inv_cdf
        table = torch.tensor([inv((i + 0.5) / n) for i in range(n)], dtype=torch.float64).float()
        _normal_tables[device] = table.to(device)
    return _normal_tables[device]


def _mix32(v: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash in int64 arithmetic that never overflows (multipliers < 2^31)."""
    v = v ^ (v >> 16)
    v = (v * 0x45D9F3B) & _MASK32
    v = v ^ (v >> 16)
    v = (v * 0x45D9F3B) & _MASK32
    return v ^ (v >> 16)


def hash_normal(key: int, shape: tuple[int, ...], device) -> torch.Tensor:
    """Standard-normal noise that is a function of (key, element index) only."""
    device = torch.device(device)
    count = math.prod(shape)
    k1, k2 = key & _MASK32, (key >> 32) & _MASK32
    v = torch.arange(count, dtype=torch.int64, device=device)
    v = _mix32(_mix32(v ^ k1) ^ k2)
    return _normal_table(device)[v >> (32 - _NORMAL_BITS)].view(shape)
