"""Pillow's antialiased resize, on uint8 tensors on any device, in exact integer arithmetic.

Pillow resizes an 8-bit image in two separable passes (`Resample.c`): per output pixel, the
filter's weights over the input pixels it covers (the support widened by the scale when
shrinking), normalised to sum to 1 and turned into 22-bit fixed point; each pass sums
`pixel * weight` in int32, adds half a unit, shifts and clips to 0..255. That arithmetic has no
floating point in it once the weights exist, so the same weights give the same bytes on every
device. Here:

- `coefficients` computes the weights on the CPU exactly as Pillow does (the same double
  operations in the same order; checked against Pillow by the tests), cached by size;
- `resize_u8` applies them to a (C, H, W) uint8 tensor on its device, horizontal pass first, as
  one gather per tap in int32 (`method="gather"`) or as a float64 matrix product
  (`method="matmul"`: every product and partial sum is an integer below 2^31, which float64 holds
  exactly in any summation order). Both give Pillow's bytes for the same pass order.

Pillow 13 runs the vertical pass first for some shapes; the two orders can differ by a level.
Where the pixels come from Pillow (the libjpeg decoder) the crop is resized by Pillow itself
(`render.crop_image`); `resize_u8` serves crops decoded on the device (nvJPEG), for which no Pillow
call exists. Its order is fixed (horizontal first), so it does not depend on a Pillow version.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2  # Pillow's: 8 bits of result, 2 for overshoot and sign


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic_filter (a = -0.5), the same double operations in the same order."""
    a = -0.5
    x = np.abs(x)
    out = np.zeros_like(x)
    near = x < 1.0
    far = (x >= 1.0) & (x < 2.0)
    xn, xf = x[near], x[far]
    out[near] = ((a + 2.0) * xn - (a + 3.0)) * xn * xn + 1
    out[far] = (((xf - 5) * xf + 8) * xf - 4) * a
    return out


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


# name -> (filter, support), Pillow's BICUBIC and BILINEAR
FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


@functools.lru_cache(maxsize=4096)
def coefficients(in_size: int, out_size: int, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for a box of the whole input:
    (xmin, weights): each output's first input index (out_size,) and its taps' int32 weights in
    22-bit fixed point (out_size, ksize); taps past the image's edge have weight 0."""
    if interpolation not in FILTERS:
        raise ValueError(f"resize implements {sorted(FILTERS)}, not {interpolation!r}")
    fn, base = FILTERS[interpolation]
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = base * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    ss = 1.0 / filterscale
    # (int)(v): truncation toward zero, then Pillow's clamps
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    k = np.arange(ksize)
    w = fn(((k[None, :] + xmin[:, None]) - center[:, None] + 0.5) * ss)
    w = np.where(k[None, :] < count[:, None], w, 0.0)
    total = np.zeros(out_size)
    for j in range(ksize):  # Pillow's running sum, in its order (np.sum would pair the terms)
        total = total + w[:, j]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    one = float(1 << PRECISION_BITS)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one)).astype(np.int32)
    xmin.flags.writeable = fixed.flags.writeable = False  # cached: shared by every caller
    return xmin, fixed


def _rows_used(in_size: int, out_size: int, interpolation: str) -> tuple[int, int]:
    """The input rows [first, last) the vertical pass reads (Pillow's ybox_first, ybox_last):
    each output's taps start at or after the previous output's, and end at or after its end."""
    xmin, weights = coefficients(in_size, out_size, interpolation)
    ksize = weights.shape[1]
    return int(xmin[0]), min(int(xmin[-1]) + ksize, in_size)


@functools.lru_cache(maxsize=4096)
def device_tables(
    in_size: int, out_size: int, interpolation: str, first: int, extent: int, method: str, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """One pass's tables on `device`, built (and copied there) once per shape and kept: for
    "gather" each output's tap indices into an input of `extent` that starts at `first`, and their
    int32 weights; for "matmul" the dense float64 matrix. A render's passes then only launch
    kernels: no copy from the host, no wait for one."""
    xmin, weights = coefficients(in_size, out_size, interpolation)
    taps = np.clip(xmin[:, None] - first + np.arange(weights.shape[1])[None, :], 0, extent - 1)
    if method == "matmul":
        dense = np.zeros((out_size, extent))
        np.add.at(dense, (np.arange(out_size)[:, None], taps), weights)  # clamped taps carry weight 0
        return (torch.from_numpy(dense).to(device),)
    if method == "gather":
        idx = torch.from_numpy(taps).to(device)
        w = torch.from_numpy(weights.astype(np.int32)).to(device)
        # one column per tap, made now: the passes slice nothing
        return tuple(idx[:, k].contiguous() for k in range(taps.shape[1])) + tuple(
            w[:, k].contiguous() for k in range(taps.shape[1])
        )
    raise ValueError(f"method must be gather or matmul, not {method!r}")


def _pass(
    x: torch.Tensor, dim: int, in_size: int, out_size: int, interpolation: str, first: int, method: str
) -> torch.Tensor:
    """One of Pillow's passes along `dim` (-1 or -2) of uint8 `x` (..., H, W), an input of
    `in_size` of which `x` holds the indices from `first` on (every index a weighted tap reads)."""
    tables = device_tables(in_size, out_size, interpolation, first, x.shape[dim], method, x.device)
    if method == "matmul":
        (m,) = tables
        xd = x.to(torch.float64)
        acc = ((xd @ m.T) if dim == -1 else (m @ xd)).to(torch.int64)
    else:
        ksize = len(tables) // 2
        acc = None
        for idx, w in zip(tables[:ksize], tables[ksize:]):
            term = x.index_select(dim, idx).to(torch.int32).mul_(w if dim == -1 else w[:, None])
            acc = term if acc is None else acc.add_(term)
    acc = acc + (1 << (PRECISION_BITS - 1))
    return (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def resize_u8(image: torch.Tensor, size: int, interpolation: str = "bicubic", method: str = "gather") -> torch.Tensor:
    """`image` (C, H, W) uint8, or a batch (B, C, H, W) of one size, on any device, resized to
    (..., size, size) with Pillow's arithmetic, horizontal pass first. Bit-identical across
    devices, thread counts, batch sizes and `method`s."""
    if image.dtype != torch.uint8 or image.dim() not in (3, 4):
        raise ValueError(
            f"resize_u8 takes a (C, H, W) or (B, C, H, W) uint8 tensor, not {tuple(image.shape)} {image.dtype}"
        )
    h, w = image.shape[-2:]
    x, first = image, 0
    if w != size:
        if h != size:  # only the rows the vertical pass reads
            first, last = _rows_used(h, size, interpolation)
            x = x[..., first:last, :]
        x = _pass(x, -1, w, size, interpolation, 0, method)
    if h != size:
        x = _pass(x, -2, h, size, interpolation, first, method)
    return x.contiguous()
