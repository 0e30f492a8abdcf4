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
import math
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .pixel_ops import (
    blend_factor,
    blend_ops,
    erase,
    lut_argument,
    lut_ops,
    normal_lut,
    normalize,
    warp,
    warp_coefficients,
)
from .policy import INCREASING_OPS, LEVEL_DENOM, OPS, AugmentPolicy
from .resample import resize_u8

PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


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


# -- the crop: the box, resized to S x S, flipped -------------------------------------------


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


def device_decoder_library() -> str:
    """Which library decodes JPEGs on the device: "torchcodec" where it is installed (torchvision's
    decoders are deprecated since 0.29 in its favour), else "torchvision"."""
    import importlib.util

    return "torchcodec" if importlib.util.find_spec("torchcodec") is not None else "torchvision"


def decode_on_device(datas: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """JPEGs decoded on `device` in one batched call (nvJPEG on CUDA, libjpeg-turbo on the CPU), by
    `device_decoder_library`. Both take a list of 1-D uint8 CPU tensors and give a list of (3, H, W)
    uint8 tensors on `device` (TorchCodec 0.17's `decode_jpeg(source: list, *, mode="RGB", device)`;
    torchvision's `decode_jpeg(input: list, mode=ImageReadMode.RGB, device=...)`)."""
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    if device_decoder_library() == "torchcodec":
        from torchcodec.decoders import decode_jpeg

        return list(decode_jpeg(tensors, mode="RGB", device=device))
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


class DeviceDecodeError(ValueError):
    """The device's decoder (nvJPEG) cannot decode an image of a batch. Under the nvjpeg decoder no
    image is ever decoded by another decoder: its pixels would not be the ones the labels and the
    render fingerprint were made from. `index` is the image's place in the batch."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


def crops_on_device(items: list[tuple], policy, device, keys: list[str] | None = None) -> torch.Tensor:
    """The uint8 (B, 3, S, S) crops of prepared items on `device`: (uint8 crop, params) as they
    are, (JPEG bytes, params) decoded there in one batched call, then cut and resized there. An
    image the device cannot decode raises DeviceDecodeError naming it (`keys`: the images' keys)."""
    device = torch.device(device)
    sources = [source for source, _ in items]
    encoded = [i for i, source in enumerate(sources) if isinstance(source, bytes | bytearray)]
    if encoded:
        check_device(policy, device)
        try:
            images = decode_on_device([sources[i] for i in encoded], device)
        except Exception as batch_error:  # which image: one at a time, on the same decoder
            for i in encoded:
                try:
                    decode_on_device([sources[i]], device)
                except Exception as e:
                    name = repr(keys[i]) if keys else f"{i} of the batch"
                    raise DeviceDecodeError(
                        f"the device's JPEG decoder cannot decode image {name} ({e}); under the nvjpeg decoder no "
                        "image is decoded by another (its pixels would not be the labels'): build the shards "
                        "without it, or label with decoder libjpeg",
                        i,
                    ) from e
            raise batch_error
        regions = [cut_region(image, items[i][1].box) for i, image in zip(encoded, images, strict=True)]
        for i, crop in zip(encoded, resized_regions(regions, [items[i][1] for i in encoded], policy)):
            sources[i] = crop
    return torch.stack([s.to(device, non_blocking=True) for s in sources])


def render_prepared(items: list[tuple], policy, device, keys: list[str] | None = None) -> torch.Tensor:
    """`render_batch` of prepared items (see `crops_on_device`)."""
    return render_batch(crops_on_device(items, policy, device, keys), [p for _, p in items], policy, device)


# -- the pixels ----------------------------------------------------------------------------


class BatchPlan:
    """A batch's drawn parameters as the device needs them, built on the CPU (in a loader worker):
    one int64 tensor, so one copy to the device, sliced at offsets the host knows (views: no
    launch, no sync). For each RandAugment layer and op family the rows that drew it and their
    arguments; for each erasing box slot its rows, boxes and noise keys. Every field exists in
    every plan (empty where no row drew it), so a render launches the same kernels whatever was
    drawn and however large the batch."""

    def __init__(self, packed: torch.Tensor, fields: dict[str, tuple[int, tuple[int, ...]]], size: int):
        self.packed, self.fields, self.size = packed, fields, size

    @classmethod
    def build(cls, params: list[CropParams], policy: AugmentPolicy) -> BatchPlan:
        spec = policy.randaugment
        layers = spec.num_layers if spec is not None else 0
        size = policy.input_size
        columns: dict[str, list] = {}
        for layer in range(layers):
            for family in ("lut", "blend", "warp"):
                columns[f"{family}{layer}.rows"] = []
            columns.update({f"lut{layer}.code": [], f"lut{layer}.arg": [], f"blend{layer}.code": [],
                            f"blend{layer}.factor": [], f"warp{layer}.coeffs": []})  # fmt: skip
        for slot in range(policy.re_count):
            columns.update({f"erase{slot}.rows": [], f"erase{slot}.box": [], f"erase{slot}.key": []})
        for i, p in enumerate(params):
            for layer, (name, arg) in enumerate(p.ops):
                op = OPS[name]
                columns[f"{op.family}{layer}.rows"].append(i)
                if op.family == "lut":
                    columns[f"lut{layer}.code"].append(op.code)
                    columns[f"lut{layer}.arg"].append(lut_argument(name, arg))
                elif op.family == "blend":
                    columns[f"blend{layer}.code"].append(op.code)
                    columns[f"blend{layer}.factor"].append(blend_factor(arg))
                else:
                    columns[f"warp{layer}.coeffs"].append(warp_coefficients(name, arg, size))
            for slot, box in enumerate(p.erase):
                columns[f"erase{slot}.rows"].append(i)
                columns[f"erase{slot}.box"].append(box)
                columns[f"erase{slot}.key"].append((p.noise_key & 0xFFFFFFFF, p.noise_key >> 32))
        width = {"factor": 2, "coeffs": 6, "box": 4, "key": 2}
        fields, flat, at = {}, [], 0
        for name, values in columns.items():
            shape = (len(values), width[name.split(".")[1]]) if name.split(".")[1] in width else (len(values),)
            fields[name] = (at, shape)
            at += math.prod(shape)
            flat.extend(v for row in values for v in (row if isinstance(row, list | tuple) else (row,)))
        return cls(torch.tensor(flat, dtype=torch.int64), fields, len(params))

    def __getitem__(self, name: str) -> torch.Tensor:
        at, shape = self.fields[name]
        return self.packed[at : at + math.prod(shape)].view(shape)

    def rows(self, name: str) -> int:
        """How many rows drew `name` (a family of a layer, "warp0", or an erasing slot): host-known."""
        return self.fields[f"{name}.rows"][1][0]

    def to(self, device, non_blocking: bool = False) -> BatchPlan:
        if self.packed.device == torch.device(device):
            return self
        return BatchPlan(self.packed.to(device, non_blocking=non_blocking), self.fields, self.size)

    def pin_memory(self) -> BatchPlan:  # the DataLoader's pin_memory calls it
        return BatchPlan(self.packed.pin_memory(), self.fields, self.size)

    def layers(self) -> int:
        return sum(1 for name in self.fields if name.startswith("lut") and name.endswith(".rows"))

    def slots(self) -> int:
        return sum(1 for name in self.fields if name.startswith("erase") and name.endswith(".rows"))


def render_batch(crops, params, policy, device=None, timings: dict | None = None, fixed: bool | None = None):
    """The normalised crops (B, 3, S, S) float32 of uint8 `crops` ((B, 3, S, S), or a list of
    (3, S, S), on any device) under `params` (their CropParams, or a BatchPlan of them), rendered on
    `device` (default: the crops'). No host sync, and (`fixed`, the default off the CPU) the same
    kernels whatever the batch drew and however large it is: the plan goes to the device in one
    copy and every family of ops runs on the rows the plan names. On a CPU (`fixed` False) a
    family no row drew is skipped and a batch renders a crop at a time (the same bytes: a crop
    never depends on its batch), which keeps a crop's work in the CPU's caches.
    `timings`, for benchmarks: seconds per stage are added to it (with a device sync per stage)."""
    if isinstance(crops, list | tuple):
        if not crops:
            raise ValueError("render_batch needs at least one crop")
        crops = torch.stack(list(crops))
    device = torch.device(device) if device is not None else crops.device
    fixed = device.type != "cpu" if fixed is None else fixed
    if not fixed and len(crops) > 1 and not isinstance(params, BatchPlan):
        one = [
            render_batch(crops[i : i + 1], params[i : i + 1], policy, device, timings, fixed) for i in range(len(crops))
        ]
        return torch.cat(one)
    plan = params if isinstance(params, BatchPlan) else BatchPlan.build(params, policy)
    if plan.size != len(crops):
        raise ValueError(f"{len(crops)} crops but a plan of {plan.size}")
    stage = _StageClock(timings, device)
    plan = plan.to(device, non_blocking=True)  # with the crops: the batch's only copies to the device
    x = randaugment(crops.to(device, non_blocking=True), plan, policy, fixed)
    stage("randaugment")
    out = normalize(x, normal_lut(tuple(policy.mean), tuple(policy.std), device))
    stage("normalize")
    out = erase_boxes(out, plan, fixed)
    stage("erase")
    return out


def randaugment(x: torch.Tensor, plan, policy, fixed: bool = True) -> torch.Tensor:
    """The RandAugment ops of each sample, in its drawn order, on uint8 (B, 3, S, S): uint8 out.
    `plan`: a BatchPlan on x's device (or the samples' CropParams); every layer runs each family
    of ops on the rows that drew it (`fixed`: also when none did)."""
    if not isinstance(plan, BatchPlan):
        plan = BatchPlan.build(plan, policy).to(x.device)
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[0] != plan.size:
        raise ValueError(f"randaugment takes one uint8 (3, S, S) crop per sample, got {tuple(x.shape)} {x.dtype}")
    x = x.clone()
    fill = _fill(fill_color(policy), x.device)
    for layer in range(plan.layers()):
        for family in ("lut", "blend", "warp"):
            name = f"{family}{layer}"
            if not fixed and plan.rows(name) == 0:
                continue
            rows = plan[f"{name}.rows"]
            sub = x.index_select(0, rows)
            if family == "lut":
                sub = lut_ops(sub, plan[f"{name}.code"], plan[f"{name}.arg"])
            elif family == "blend":
                factor = plan[f"{name}.factor"]
                sub = blend_ops(sub, plan[f"{name}.code"], factor[:, 0], factor[:, 1])
            else:
                sub = warp(sub, plan[f"{name}.coeffs"], fill, policy.interpolation)
            x.index_copy_(0, rows, sub)
    return x


def erase_boxes(out: torch.Tensor, plan: BatchPlan, fixed: bool = True) -> torch.Tensor:
    """Random erasing of the normalised crops: each box slot on the rows that drew a box in it."""
    for slot in range(plan.slots()):
        name = f"erase{slot}"
        if not fixed and plan.rows(name) == 0:
            continue
        rows = plan[f"{name}.rows"]
        out.index_copy_(0, rows, erase(out.index_select(0, rows), plan[f"{name}.box"], plan[f"{name}.key"]))
    return out


def fill_color(policy) -> tuple[int, int, int]:
    """timm's fill for the geometric ops: the mean colour in 0..255."""
    return tuple(min(255, round(255 * m)) for m in policy.mean)


@functools.cache
def _fill(color: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    return torch.tensor(color, dtype=torch.uint8).to(device)


def normalize_and_erase(x: torch.Tensor, params, policy) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> timm's ToTensor + Normalize (looked up, not computed), then erasing."""
    plan = params if isinstance(params, BatchPlan) else BatchPlan.build(params, policy)
    out = normalize(x, normal_lut(tuple(policy.mean), tuple(policy.std), x.device))
    return erase_boxes(out, plan.to(x.device))


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


def apply_op(name: str, x: torch.Tensor, args: list[float], fill=(124, 116, 104), interpolation="bicubic"):
    """One RandAugment op on every sample of uint8 `x` (n, 3, S, S), one argument each (for tests
    and benchmarks: the render runs the families through `randaugment`)."""
    n, op = len(x), OPS[name]
    on = {"device": x.device}
    if op.family == "lut":
        code = torch.full((n,), op.code, **on)
        return lut_ops(x, code, torch.tensor([lut_argument(name, a) for a in args], **on))
    if op.family == "blend":
        factor = torch.tensor([blend_factor(a) for a in args], **on)
        return blend_ops(x, torch.full((n,), op.code, **on), factor[:, 0], factor[:, 1])
    coeffs = torch.tensor([warp_coefficients(name, a, x.shape[-1]) for a in args], dtype=torch.int64, **on)
    return warp(x, coeffs, torch.tensor(fill, dtype=torch.uint8, **on), interpolation)
