"""The torch renderer's pixel operations: uint8 crops in and out, integer arithmetic only.

Each function works on the rows of a batch that drew one family of RandAugment ops, with every
per-row argument a tensor (`render.BatchPlan` packs them on the CPU): one call per family and
layer, however many rows and whichever ops they drew, and nothing a device could round
differently (the only floats are looked up in tables built once on the CPU).

- `lut_ops`: the pointwise ops as a 256-entry table per row and channel: Invert, Posterize,
  Solarize, SolarizeAdd from their argument; AutoContrast and Equalize from the row's histogram
  (a scatter_add: no sync); one gather applies them.
- `blend_ops`: Pillow's ImageEnhance: blend(degenerate, image, factor) with the degenerate image of
  each row's op (black, its grey, its mean grey, its smoothing) and the factor in 32-bit fixed point.
- `warp`: Pillow's affine transform (Rotate, Shear, Translate) in fixed point.
- `normalize`, `erase`: timm's ToTensor + Normalize as a lookup; erasing noise from a
  counter-based hash of (key, pixel) through an inverse-normal table.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .policy import OPS, family

# per-row op codes of the families (the op table's: policy.OPS)
LUT_CODES = {name: OPS[name].code for name in family("lut")}
BLEND_CODES = {name: OPS[name].code for name in family("blend")}
GEOMETRIC_OPS = family("warp")

BLEND_BITS = 32  # a blend factor F = f 2^32 (Pillow's float32 factor, exactly)
COORD_BITS = 32  # fractional bits of a warp's coefficients
TABLE_BITS = 12  # the warp's interpolation table holds 2^12 + 1 fractional positions in [0, 1]
# its weights, in fixed point: 11 bits keep the sum of 16 taps' products in int32 (Pillow's cubic
# reaches 1.25 over its positive taps and -0.25 over its negative ones: 255 x 1.25^2 x 2^22 < 2^31)
WEIGHT_BITS = 11


# -- the arguments, on the CPU: what BatchPlan packs per row ----------------------------------


def lut_argument(name: str, arg: float) -> int:
    """A LUT op's integer argument: Posterize's bit mask, Solarize's threshold, SolarizeAdd's addend."""
    if name == "PosterizeIncreasing":
        bits = int(arg)
        return (0xFF << (8 - bits)) & 0xFF if bits < 8 else 0xFF  # keep the top `bits` bits; 0 bits: black
    return int(arg)


def blend_factor(arg: float) -> tuple[int, int]:
    """Pillow's float32 factor in 32-bit fixed point, split in two 16-bit halves (int32 products)."""
    f = round(float(np.float32(arg)) * (1 << BLEND_BITS))
    return f >> 16, f & 0xFFFF


def affine(name: str, v: float, w: int, h: int) -> tuple[float, ...]:
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


def warp_coefficients(name: str, v: float, size: int) -> list[int]:
    """`affine` in fixed point for the integer warp: source = a (xo + 1/2) + b (yo + 1/2) + c,
    scaled by 2^(bits + 1) and taken over (2 xo + 1), (2 yo + 1)."""
    a, b, c, d, e, f = affine(name, v, size, size)
    one = 1 << COORD_BITS
    return [round(a * one), round(b * one), round(c * 2 * one), round(d * one), round(e * one), round(f * 2 * one)]


# -- the pointwise ops: a table per row and channel ------------------------------------------


def lut_ops(x: torch.Tensor, code: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    """The LUT ops of rows `x` (n, 3, S, S) uint8, row i doing op `code[i]` (LUT_CODES) with
    argument `arg[i]` (`lut_argument`)."""
    n, c = x.shape[:2]
    levels = torch.arange(256, dtype=torch.int32, device=x.device).view(1, 256)
    code, arg = code.view(n, 1), arg.to(torch.int32).view(n, 1)
    inverted = 255 - levels
    static = torch.where(code == LUT_CODES["Invert"], inverted, levels)
    static = torch.where(code == LUT_CODES["PosterizeIncreasing"], levels & arg, static)
    static = torch.where(code == LUT_CODES["SolarizeIncreasing"], torch.where(levels < arg, levels, inverted), static)
    added = torch.where(levels < 128, (levels + arg).clamp_(max=255), levels)
    static = torch.where(code == LUT_CODES["SolarizeAdd"], added, static)
    hist = histograms(x)  # (n c, 256)
    code = code.repeat_interleave(c, dim=0)
    lut = torch.where(code == LUT_CODES["AutoContrast"], _autocontrast_lut(hist), static.repeat_interleave(c, dim=0))
    lut = torch.where(code == LUT_CODES["Equalize"], _equalize_lut(hist), lut)
    return lut.to(torch.uint8).gather(1, x.reshape(n * c, x.shape[2] * x.shape[3]).to(torch.int64)).view(x.shape)


def histograms(x: torch.Tensor) -> torch.Tensor:
    """(n c, 256) int32 counts of each row's channels, by scatter_add (bincount would sync)."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).to(torch.int64) + torch.arange(n * c, device=x.device).view(-1, 1) * 256
    ones = torch.ones(1, dtype=torch.int32, device=x.device).expand(flat.numel())
    hist = torch.zeros(n * c * 256, dtype=torch.int32, device=x.device)
    return hist.scatter_add_(0, flat.view(-1), ones).view(n * c, 256)


def _autocontrast_lut(hist: torch.Tensor) -> torch.Tensor:
    """Pillow's ImageOps.autocontrast per channel: (v - lo) * 255 / (hi - lo), truncated."""
    levels = torch.arange(256, dtype=torch.int32, device=hist.device).view(1, 256)
    present = hist > 0
    lo = torch.where(present, levels, 256).amin(dim=1, keepdim=True)
    hi = torch.where(present, levels, -1).amax(dim=1, keepdim=True)
    flat = hi <= lo
    lut = ((levels - lo) * 255).div_(torch.where(flat, 1, hi - lo), rounding_mode="floor").clamp_(0, 255)
    return torch.where(flat, levels, lut)


def _equalize_lut(hist: torch.Tensor) -> torch.Tensor:
    """Pillow's ImageOps.equalize per channel, in integers."""
    hist = hist.to(torch.int64)
    levels = torch.arange(256, device=hist.device)
    present = hist > 0
    last = (levels * present).amax(dim=1, keepdim=True)
    step = (hist.sum(dim=1, keepdim=True) - hist.gather(1, last)) // 255
    identity = (present.sum(dim=1, keepdim=True) <= 1) | (step == 0)
    safe = torch.where(identity, torch.ones_like(step), step)
    lut = ((safe // 2 + hist.cumsum(dim=1) - hist) // safe).clamp_(max=255)
    return torch.where(identity, levels.expand_as(lut), lut).to(torch.int32)


# -- the blends: Pillow's ImageEnhance -------------------------------------------------------


def blend_ops(x: torch.Tensor, code: torch.Tensor, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The ImageEnhance ops of rows `x`, row i doing op `code[i]` (BLEND_CODES) with the factor
    `blend_factor` split into (high[i], low[i]): Pillow's blend(degenerate, x, f), truncated."""
    n = x.shape[0]
    xi = x.to(torch.int32)
    code = code.view(n, 1, 1, 1)
    luma = _luma(xi)
    pixels = x.shape[2] * x.shape[3]
    mean = (2 * luma.sum(dim=(1, 2, 3), dtype=torch.int64) + pixels) // (2 * pixels)  # Pillow's int(mean + 0.5)
    degenerate = torch.where(code == BLEND_CODES["ColorIncreasing"], luma, 0)  # brightness: black
    degenerate = torch.where(code == BLEND_CODES["ContrastIncreasing"], mean.to(torch.int32).view(n, 1, 1, 1),
                             degenerate)  # fmt: skip
    degenerate = torch.where(code == BLEND_CODES["SharpnessIncreasing"], _smooth(xi), degenerate)
    return _blend(degenerate, xi, high.to(torch.int32).view(n, 1, 1, 1), low.to(torch.int32).view(n, 1, 1, 1))


def _blend(a: torch.Tensor, b: torch.Tensor, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """a + floor(F (b - a) / 2^32) for F = high 2^16 + low, in int32 as
    floor((high d + floor(low d / 2^16)) / 2^16): exactly floor(a + f (b - a)) for Pillow's
    float32 factor f. Pillow rounds its float32 product and sum, so it lands a level higher where
    the exact value falls just short of an integer."""
    d = b - a
    return (a + ((d * high + ((d * low) >> 16)) >> 16)).clamp_(0, 255).to(torch.uint8)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L conversion: (19595 R + 38470 G + 7471 B + 2^15) >> 16, as (n, 1, H, W)."""
    return (x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 32768) >> 16


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


# -- the warps: Pillow's affine transform in fixed point ------------------------------------


@functools.cache
def _interpolation_table(interpolation: str, device: torch.device) -> tuple[tuple[int, ...], torch.Tensor]:
    """(tap offsets, int32 weights (2^T + 1, taps) summing to 2^W) of Pillow's transform filter at
    fractional position d = i / 2^T: its bicubic (a = -1, as its BICUBIC macro) or bilinear."""
    d = np.arange((1 << TABLE_BITS) + 1) / (1 << TABLE_BITS)
    if interpolation == "bicubic":
        offsets = (-1, 0, 1, 2)
        w = np.stack([-d + 2 * d**2 - d**3, 1 - 2 * d**2 + d**3, d + d**2 - d**3, -(d**2) + d**3], axis=1)
    else:
        offsets = (0, 1)
        w = np.stack([1 - d, d], axis=1)
    fixed = np.round(w * (1 << WEIGHT_BITS)).astype(np.int64)
    largest = np.abs(fixed).argmax(axis=1)  # so that a flat area stays flat: each row sums to 2^W
    fixed[np.arange(len(d)), largest] += (1 << WEIGHT_BITS) - fixed.sum(axis=1)
    return offsets, torch.from_numpy(fixed.astype(np.int32)).to(device)


def warp(x: torch.Tensor, coeffs: torch.Tensor, fill: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Pillow's affine transform of each row of `x` (n, c, S, S) uint8 with its `warp_coefficients`
    (n, 6) int64: an output pixel whose source lies outside the image gets `fill` (c,) uint8;
    inside, the filter's taps are clamped to the image's edge and the result truncated, as
    Pillow's. Coordinates in 32-bit fixed point, the filter read from a table, the taps summed
    along each row, then down the column: integers throughout (int32 but for the coordinates)."""
    n, c, h, w = x.shape
    one = 1 << COORD_BITS
    m = coeffs.view(n, 6, 1, 1)
    xo = (2 * torch.arange(w, device=x.device) + 1).view(1, 1, w)
    yo = (2 * torch.arange(h, device=x.device) + 1).view(1, h, 1)
    sx = m[:, 0] * xo + (m[:, 1] * yo + m[:, 2])  # (n, h, w), source x times 2^(bits + 1)
    sy = m[:, 3] * xo + (m[:, 4] * yo + m[:, 5])
    scale = 2 * one
    inside = (sx >= 0) & (sx < w * scale) & (sy >= 0) & (sy < h * scale)
    offsets, table = _interpolation_table(interpolation, x.device)
    shift = COORD_BITS + 1 - TABLE_BITS

    def taps(s: torch.Tensor, size: int):
        s = s - one  # the filter works on pixel centres: source - 1/2
        i = s >> (COORD_BITS + 1)  # floor
        frac = s - (i << (COORD_BITS + 1))
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
    value = (acc >> (2 * WEIGHT_BITS)).clamp_(0, 255).to(torch.uint8)
    value = value.view(c, n, h, w).transpose(0, 1)
    return torch.where(inside.unsqueeze(1), value, fill.view(1, c, 1, 1)).contiguous()


# -- normalisation and erasing ---------------------------------------------------------------


@functools.cache
def normal_lut(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(3, 256) float32: level v of channel c as timm computes it on the CPU (ToTensor's v / 255,
    then Normalize's (x - mean) / std, in float32)."""
    levels = torch.arange(256, dtype=torch.float32).div(255).expand(3, 256)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1)
    return levels.sub(m).div(s).to(device)


def normalize(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> the floats of `table` (3, 256): a lookup per channel."""
    flat = x.transpose(0, 1).reshape(3, -1).to(torch.int64)
    out = torch.stack([table[c].index_select(0, flat[c]) for c in range(3)])
    return out.view(3, x.shape[0], *x.shape[2:]).transpose(0, 1).contiguous()


def erase(out: torch.Tensor, boxes: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Rows `out` (n, 3, S, S) float with erasing noise in box (top, left, h, w) of `boxes` (n, 4):
    noise element (ch, i, j) of a box is `hash_normal(key, (3, h, w))`'s, key = keys[:, 0] +
    2^32 keys[:, 1]: the same values on every device, whatever else is in the batch."""
    n, c, h, w = out.shape
    top, left, bh, bw = (boxes[:, k].view(n, 1, 1, 1) for k in range(4))
    ii = torch.arange(h, device=out.device).view(1, 1, h, 1)
    jj = torch.arange(w, device=out.device).view(1, 1, 1, w)
    ch = torch.arange(c, device=out.device).view(1, c, 1, 1)
    inside = (ii >= top) & (ii < top + bh) & (jj >= left) & (jj < left + bw)
    index = (ch * bh + (ii - top)) * bw + (jj - left)  # the element's index in the box's noise
    noise = _hash_table(index, keys[:, 0].view(n, 1, 1, 1), keys[:, 1].view(n, 1, 1, 1), out.device)
    return torch.where(inside, noise, out)


_MASK32 = 0xFFFFFFFF
_NORMAL_BITS = 16


@functools.cache
def _normal_table(device: torch.device) -> torch.Tensor:
    """Inverse normal CDF at the centres of 2^16 equal bins: float32, computed once in float64."""
    from statistics import NormalDist

    n = 1 << _NORMAL_BITS
    inv = NormalDist().inv_cdf
    return torch.tensor([inv((i + 0.5) / n) for i in range(n)], dtype=torch.float64).float().to(device)


def _mix32(v: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash in int64 arithmetic that never overflows (multipliers < 2^31)."""
    v = v ^ (v >> 16)
    v = (v * 0x45D9F3B) & _MASK32
    v = v ^ (v >> 16)
    v = (v * 0x45D9F3B) & _MASK32
    return v ^ (v >> 16)


def _hash_table(index: torch.Tensor, k1, k2, device: torch.device) -> torch.Tensor:
    v = _mix32(_mix32(index.to(torch.int64) ^ k1) ^ k2)
    return _normal_table(device)[v >> (32 - _NORMAL_BITS)]


def hash_normal(key: int, shape: tuple[int, ...], device) -> torch.Tensor:
    """Standard-normal noise that is a function of (key, element index) only."""
    device = torch.device(device)
    index = torch.arange(math.prod(shape), dtype=torch.int64, device=device)
    return _hash_table(index, key & _MASK32, (key >> 32) & _MASK32, device).view(shape)
