"""The torch renderer: DeiT's training crop drawn on the CPU, rendered batched on any torch device.

`AugmentPolicy(renderer="torch")` splits the crop in two:

- **Parameters**, drawn per sample on the CPU from the sample's seed (`draw_params`): the
  RandomResizedCrop box, the flip, RandAugment's ops with timm's semantics (n ops chosen with
  replacement from the "increasing" set, each applied with probability p, magnitude from N(m, mstd)
  clipped to [0, 10], random sign where timm negates), random erasing's boxes and a key for its
  noise. Microseconds a sample; they need only the image's size.
- **Pixels**, rendered for a whole batch on the device where the model runs (`render_batch`):
  crop + antialiased resize, flip, the RandAugment ops in their drawn order (each op on the
  samples that drew it, with per-sample arguments), normalisation, erasing.

Determinism: a crop is a function of (policy, key, seed) only, not of its batch, its position in
the batch, the process or its thread count. Batched arithmetic is restricted to operations IEEE
rounds exactly (+, -, *, /, comparisons, rounding, integer ops); per-image statistics (histograms,
means) are integer sums; work that is not (the resize, the geometric warp) is done per sample or
per output pixel in a fixed order. Erasing noise is a counter-based hash of (sample key, pixel)
mapped through a fixed inverse-normal table, so it is the same on every device. On the CPU a crop
is bit-identical everywhere; on CUDA the resize and warp differ from the CPU's by float rounding.
"""

from __future__ import annotations

import io
import math
import random
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

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


# -- decoding -----------------------------------------------------------------------------


def to_uint8_chw(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) uint8 tensor (no copy of the pixels beyond PIL's)."""
    import numpy as np

    arr = np.asarray(image.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def decode_on_device(datas: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """JPEGs decoded on a CUDA device in one batched call (nvJPEG): TorchCodec's decoder where it
    is installed (the kept path), torchvision's otherwise (deprecated since torchvision 0.29)."""
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


def render_prepared(items: list[tuple], policy, device) -> torch.Tensor:
    """`render_batch` of prepared items: (uint8 region, params) or (JPEG bytes, params); the JPEGs
    are decoded on `device` in one batched call, then cut to their boxes."""
    device = torch.device(device)
    regions = [source for source, _ in items]
    encoded = [i for i, source in enumerate(regions) if isinstance(source, bytes | bytearray)]
    if encoded:
        try:
            images = decode_on_device([regions[i] for i in encoded], device)
        except Exception:  # e.g. a CMYK JPEG nvJPEG refuses: one at a time, on the CPU if need be
            images = [_decode_one(regions[i], device) for i in encoded]
        for i, image in zip(encoded, images, strict=True):
            top, left, h, w = items[i][1].box
            regions[i] = image[:, top : top + h, left : left + w]
    return render_batch(regions, [params for _, params in items], policy, device)


def _decode_one(data: bytes, device: torch.device) -> torch.Tensor:
    try:
        return decode_on_device([data], device)[0]
    except Exception:
        with Image.open(io.BytesIO(data)) as im:
            return to_uint8_chw(im).to(device)


# -- rendering ----------------------------------------------------------------------------


def render_batch(
    regions: list[torch.Tensor], params: list[CropParams], policy, device=None, timings: dict | None = None
) -> torch.Tensor:
    """The normalised crops (B, 3, S, S) float32 of `regions` (each the uint8 (3, h, w) content of
    its params' box, on any device) under `params`; rendered on `device` (default: the regions').
    `timings`, for benchmarks: seconds per stage are added to it (with a device sync per stage)."""
    if not regions:
        raise ValueError("render_batch needs at least one region")
    device = torch.device(device) if device is not None else regions[0].device
    stage = _StageClock(timings, device)
    size = policy.input_size
    # crop + antialiased resize, one sample at a time: its result cannot depend on its neighbours.
    # On the CPU in uint8 (fixed-point weights, as PIL; several times faster than float there),
    # elsewhere in float32 (CUDA has no uint8 kernel), rounded: the two differ by a level at most.
    x = torch.empty((len(regions), 3, size, size), dtype=torch.float32, device=device)
    for i, region in enumerate(regions):
        r = region.to(device, non_blocking=True).unsqueeze(0)
        if device.type != "cpu":
            r = r.float()
        if r.shape[-2:] != (size, size):
            r = F.interpolate(r, size=(size, size), mode=policy.interpolation, align_corners=False, antialias=True)
        x[i] = r[0]
    x = x.round_().clamp_(0, 255)
    flip = [i for i, p in enumerate(params) if p.flip]
    if flip:
        idx = torch.tensor(flip, device=device)
        x[idx] = x[idx].flip(-1)
    stage("crop_resize_flip")
    fill = torch.tensor([min(255, round(255 * m)) for m in policy.mean], device=device).view(1, 3, 1, 1)
    depth = max((len(p.ops) for p in params), default=0)
    for layer in range(depth):
        groups: dict[str, tuple[list[int], list[float]]] = {}
        for i, p in enumerate(params):
            if layer < len(p.ops):
                name, arg = p.ops[layer]
                groups.setdefault(name, ([], []))
                groups[name][0].append(i)
                groups[name][1].append(arg)
        for name, (rows, args) in groups.items():
            idx = torch.tensor(rows, device=device)
            x[idx] = _apply_op(name, x[idx], args, fill)
    stage("randaugment")
    mean = torch.tensor(policy.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(policy.std, device=device).view(1, 3, 1, 1)
    x = x.div_(255.0).sub_(mean).div_(std)
    stage("normalize")
    for i, p in enumerate(params):
        for top, left, h, w in p.erase:
            if policy.re_mode == "pixel":
                x[i, :, top : top + h, left : left + w] = hash_normal(p.noise_key, (3, h, w), device)
            else:
                x[i, :, top : top + h, left : left + w] = 0.0
    stage("erase")
    return x


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


def _per_sample(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(-1, 1, 1, 1)


def _apply_op(name: str, x: torch.Tensor, args: list[float], fill: torch.Tensor) -> torch.Tensor:
    """One RandAugment op on the samples `x` (float, integer-valued 0..255), one argument each."""
    if name in GEOMETRIC_OPS:
        return _warp(x, name, args, fill)
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Invert":
        return 255.0 - x
    if name == "PosterizeIncreasing":
        bits = torch.tensor([int(a) for a in args], dtype=torch.int32, device=x.device).view(-1, 1, 1, 1)
        mask = 256 - torch.pow(2, 8 - bits)  # keep the top `bits` bits; 0 bits: black
        return (x.to(torch.int32) & mask).float()
    if name == "SolarizeIncreasing":
        t = _per_sample(args, x)
        return torch.where(x < t, x, 255.0 - x)
    if name == "SolarizeAdd":
        a = _per_sample(args, x)
        return torch.where(x < 128.0, (x + a).clamp_(max=255.0), x)
    f = _per_sample(args, x)
    if name == "BrightnessIncreasing":
        degenerate = torch.zeros_like(x)
    elif name == "ColorIncreasing":
        degenerate = _luma(x).expand_as(x)
    elif name == "ContrastIncreasing":
        luma = _luma(x).to(torch.int64)
        n = luma[0].numel()
        mean = (2 * luma.sum(dim=(1, 2, 3)) + n) // (2 * n)  # int(mean + 0.5), exactly
        degenerate = mean.float().view(-1, 1, 1, 1).expand_as(x)
    elif name == "SharpnessIncreasing":
        degenerate = _smooth(x)
    else:  # pragma: no cover - the op list and this function are kept together
        raise ValueError(f"unknown op {name}")
    return _blend(degenerate, x, f)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(a, b, f) = a + f * (b - a), clipped to 0..255 and rounded."""
    return (a + f * (b - a)).round_().clamp_(0, 255)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L conversion in integers: (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
    xi = x.to(torch.int64)
    luma = (xi[:, 0:1] * 19595 + xi[:, 1:2] * 38470 + xi[:, 2:3] * 7471 + 32768) >> 16
    return luma.float()


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    flat = hi <= lo
    scale = 255.0 / torch.where(flat, torch.ones_like(hi), hi - lo)
    out = (x * scale - lo * scale).floor_().clamp_(0, 255)
    return torch.where(flat, x, out)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per channel, in integers."""
    n, c = x.shape[:2]
    xi = x.to(torch.int64).reshape(n * c, -1)
    offsets = torch.arange(n * c, device=x.device).view(-1, 1) * 256
    hist = torch.bincount((xi + offsets).reshape(-1), minlength=n * c * 256).view(n * c, 256)
    levels = torch.arange(256, device=x.device)
    present = hist > 0
    last = (levels * present).amax(dim=1, keepdim=True)
    step = (hist.sum(dim=1, keepdim=True) - hist.gather(1, last)) // 255
    identity = (present.sum(dim=1, keepdim=True) <= 1) | (step == 0)
    safe = torch.where(identity, torch.ones_like(step), step)
    lut = ((safe // 2 + hist.cumsum(dim=1) - hist) // safe).clamp_(max=255)
    lut = torch.where(identity, levels.expand_as(lut), lut)
    return lut.gather(1, xi).view(x.shape).float()


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageFilter.SMOOTH (3x3, centre 5, scale 13) as nine shifted sums in a fixed order;
    the border keeps the original pixels, as PIL's filter does."""
    out = x.clone()
    h, w = x.shape[-2:]
    acc = x[..., 1 : h - 1, 1 : w - 1] * 5.0
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if (dy, dx) != (1, 1):
                acc = acc + x[..., dy : h - 2 + dy, dx : w - 2 + dx]
    out[..., 1 : h - 1, 1 : w - 1] = (acc / 13.0).round_()
    return out


def _warp(x: torch.Tensor, name: str, args: list[float], fill: torch.Tensor) -> torch.Tensor:
    """PIL's affine transform for each sample: output pixel centre (xo, yo) reads input
    (a xo + b yo + c, d xo + e yo + f); outside the image reads the fill colour."""
    n, _, h, w = x.shape
    coeffs = []
    for v in args:
        if name == "Rotate":  # PIL's rotate: counter-clockwise about the centre
            t = -math.radians(v)
            cos, sin = math.cos(t), math.sin(t)
            cx, cy = w / 2.0, h / 2.0
            coeffs.append((cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy))
        elif name == "ShearX":
            coeffs.append((1.0, v, 0.0, 0.0, 1.0, 0.0))
        elif name == "ShearY":
            coeffs.append((1.0, 0.0, 0.0, v, 1.0, 0.0))
        elif name == "TranslateXRel":
            coeffs.append((1.0, 0.0, v * w, 0.0, 1.0, 0.0))
        else:  # TranslateYRel
            coeffs.append((1.0, 0.0, 0.0, 0.0, 1.0, v * h))
    m = torch.tensor(coeffs, dtype=torch.float32, device=x.device).view(n, 6, 1, 1)
    xo = (torch.arange(w, device=x.device, dtype=torch.float32) + 0.5).view(1, 1, w)
    yo = (torch.arange(h, device=x.device, dtype=torch.float32) + 0.5).view(1, h, 1)
    a, b, c, d, e, f = (m[:, k] for k in range(6))
    xi = a * xo + b * yo + c
    yi = d * xo + e * yo + f
    grid = torch.stack((xi * (2.0 / w) - 1.0, yi * (2.0 / h) - 1.0), dim=-1)
    out = F.grid_sample(x - fill, grid, mode="bicubic", padding_mode="zeros", align_corners=False)
    return (out + fill).round_().clamp_(0, 255)


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
