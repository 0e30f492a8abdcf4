"""The torch renderer: DeiT's training crop drawn on the CPU, rendered batched on any torch device,
the same bytes on every device.

`AugmentPolicy(renderer="torch")` splits a crop in three, each in a module of its own:

- **Parameters** (`params.py`: `draw_params`), drawn per sample on the CPU from its seed: the box,
  the flip, RandAugment's ops and arguments, erasing's boxes and its noise key.
- **The crop** (`crop.py`; `device_decode.py` for JPEGs decoded on the GPU): the box cut out of the
  decoded image, resized to S x S with Pillow's antialiased filter, flipped: a uint8 (3, S, S).
  The decoder is part of the policy: `libjpeg` decodes and resizes with Pillow where the loader
  runs; `nvjpeg` decodes on the GPU and resizes there with Pillow's arithmetic (`resample.py`).
- **The pixels** (here, `render_batch`), for a whole batch on the device where the model runs,
  from its drawn parameters packed in one tensor (`plan.py`: `BatchPlan`): the RandAugment ops in
  their drawn order (each op on the samples that drew it, with per-sample arguments),
  normalisation and erasing.

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

import torch

from .device_decode import crops_on_device
from .pixel_ops import blend_ops, erase, lut_ops, normal_lut, normalize, warp
from .plan import BatchPlan


def render_items(items: list[tuple], policy, device, keys: list[str] | None = None) -> torch.Tensor:
    """`render_batch` of (source, params) items: a uint8 crop cut on the CPU, or a JPEG the device
    decodes and cuts (`device_decode.crops_on_device`)."""
    return render_batch(crops_on_device(items, policy, device, keys), [p for _, p in items], policy, device)


def render_batch(crops, params, policy, device=None, timings: dict | None = None, every_family: bool | None = None):
    """The normalised crops (B, 3, S, S) float32 of uint8 `crops` ((B, 3, S, S), or a list of
    (3, S, S), on any device) under `params` (their CropParams, or a BatchPlan of them), rendered on
    `device` (default: the crops'). No host sync. `every_family` (the default off the CPU): every
    op family of every layer runs, on the rows the plan names, also on none, so a render
    launches the same kernels whatever the batch drew and however large it is, without the host
    ever asking what was drawn; the plan goes to the device in one copy. On a CPU (`every_family`
    False) a family no row drew is skipped and a batch renders a crop at a time (the same bytes: a
    crop never depends on its batch), which keeps a crop's work in the CPU's caches.
    `timings`, for benchmarks: seconds per stage are added to it (with a device sync per stage)."""
    if isinstance(crops, list | tuple):
        if not crops:
            raise ValueError("render_batch needs at least one crop")
        crops = torch.stack(list(crops))
    device = torch.device(device) if device is not None else crops.device
    every_family = device.type != "cpu" if every_family is None else every_family
    if not every_family and len(crops) > 1 and not isinstance(params, BatchPlan):
        one = [
            render_batch(crops[i : i + 1], params[i : i + 1], policy, device, timings, every_family)
            for i in range(len(crops))
        ]
        return torch.cat(one)
    plan = params if isinstance(params, BatchPlan) else BatchPlan.build(params, policy)
    if plan.size != len(crops):
        raise ValueError(f"{len(crops)} crops but a plan of {plan.size}")
    stage = _StageClock(timings, device)
    plan = plan.to(device, non_blocking=True)  # with the crops: the batch's only copies to the device
    x = randaugment(crops.to(device, non_blocking=True), plan, policy, every_family)
    stage("randaugment")
    out = normalize(x, normal_lut(tuple(policy.mean), tuple(policy.std), device))
    stage("normalize")
    out = erase_boxes(out, plan, every_family)
    stage("erase")
    return out


def randaugment(x: torch.Tensor, plan, policy, every_family: bool = True) -> torch.Tensor:
    """The RandAugment ops of each sample, in its drawn order, on uint8 (B, 3, S, S): uint8 out.
    `plan`: a BatchPlan on x's device (or the samples' CropParams); every layer runs each family
    of ops on the rows that drew it (`every_family`: also when none did)."""
    if not isinstance(plan, BatchPlan):
        plan = BatchPlan.build(plan, policy).to(x.device)
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[0] != plan.size:
        raise ValueError(f"randaugment takes one uint8 (3, S, S) crop per sample, got {tuple(x.shape)} {x.dtype}")
    x = x.clone()
    fill = _fill(fill_color(policy), x.device)
    for layer in range(plan.layers()):
        for family in ("lut", "blend", "warp"):
            name = f"{family}{layer}"
            if not every_family and plan.rows(name) == 0:
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


def erase_boxes(out: torch.Tensor, plan: BatchPlan, every_family: bool = True) -> torch.Tensor:
    """Random erasing of the normalised crops: each box slot on the rows that drew a box in it."""
    for slot in range(plan.slots()):
        name = f"erase{slot}"
        if not every_family and plan.rows(name) == 0:
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
