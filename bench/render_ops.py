"""The torch renderer on a device against the CPU, part by part, on the same inputs; one JSON line.

python bench/render_ops.py [--device cuda] [--crops 64] [--size 224]

On ImageNet-shaped JPEGs (`common.imagenet_like_jpegs`) decoded by Pillow and cut to uint8 crops on
the CPU, every part of the render runs once on the CPU and once on `--device`:

- `resize_gather`, `resize_matmul`: the device resize (`shards.resample.resize_u8`, the nvJPEG
  path's) of random boxes of the decoded images, by each method;
- one row per RandAugment op: the op alone on every crop, its argument drawn as timm draws it at
  magnitude 9 (a random sign where timm negates);
- `normalize_and_erase`: the lookup normalisation and the hash noise of erasing;
- `render_batch`: the whole render (each crop's drawn ops, normalisation, erasing).

Each row is the largest difference (grey levels for uint8 parts, float units for the normalised
output) and the share of values that differ; the contract is 0 everywhere. With `--device cpu` it
compares the CPU with itself (what the tests run, to keep this script working without a GPU).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_core import parse_script_args  # noqa: E402
from shards import AugmentPolicy, cut_crop, decode_image  # noqa: E402
from shards.policy import (
    INCREASING_OPS,
    OPS,  # noqa: E402
)
from shards.render import fill_color, randaugment, render_batch
from shards.resample import resize_u8  # noqa: E402

from common import apply_op, imagenet_like_jpegs, normalize_and_erase  # noqa: E402


class BenchRenderOps(BaseModel):
    device: str = Field("cuda", description="the device compared with the CPU")
    crops: int = Field(64, ge=2, description="crops per op")
    size: int = Field(224, ge=8, description="crop size")
    boxes: int = Field(24, ge=1, description="boxes resized per resize method")


def compare(cpu: torch.Tensor, dev: torch.Tensor) -> dict:
    diff = (cpu.double() - dev.cpu().double()).abs()
    return {"max": round(float(diff.max()), 6), "differ": round(float((diff > 0).double().mean()), 6)}


def render_ops(args: BenchRenderOps) -> dict:
    device = torch.device(args.device)
    policy = AugmentPolicy(input_size=args.size, renderer="torch")
    images = [decode_image(j) for j in imagenet_like_jpegs(args.crops, seed=2)]
    prepared = [cut_crop(im, f"k{i}", i, policy) for i, im in enumerate(images)]
    crops = torch.stack([c for c, _ in prepared])
    params = [p for _, p in prepared]
    rng = random.Random(0)
    out: dict = {"device": str(device), "crops": len(crops), "size": args.size}
    t0 = time.perf_counter()
    for method in ("gather", "matmul"):
        worst = {"max": 0.0, "differ": 0.0}
        for b in range(args.boxes):
            im = images[b % len(images)]
            h, w = rng.randint(8, im.height), rng.randint(8, im.width)
            top, left = rng.randint(0, im.height - h), rng.randint(0, im.width - w)
            region = torch.from_numpy(np.asarray(im)[top : top + h, left : left + w].transpose(2, 0, 1).copy())
            on_cpu = resize_u8(region, args.size, "bicubic", "gather")
            c = compare(on_cpu, resize_u8(region.to(device), args.size, "bicubic", method))
            worst = {k: max(worst[k], c[k]) for k in worst}
        out[f"resize_{method}"] = worst
    fill = fill_color(policy)
    for name in INCREASING_OPS:
        op_rng = random.Random(name)
        op_args = [OPS[name].argument(0.9, op_rng) for _ in range(len(crops))]  # magnitude 9
        out[name] = compare(apply_op(name, crops, op_args, fill), apply_op(name, crops.to(device), op_args, fill))
    after = randaugment(crops, params, policy)
    out["normalize_and_erase"] = compare(
        normalize_and_erase(after, params, policy), normalize_and_erase(after.to(device), params, policy)
    )
    whole = render_batch(crops, params, policy, "cpu")
    out["render_batch"] = compare(whole, render_batch(crops, params, policy, device))
    out["all_zero"] = all(v["max"] == 0 for v in out.values() if isinstance(v, dict))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main():
    print(json.dumps(render_ops(parse_script_args(BenchRenderOps, __doc__))))


if __name__ == "__main__":
    main()
