"""Shards build and seeded-augment throughput on the demo data; prints one JSON line.

python bench/data.py [--n 500]
"""

import json
import tempfile
import time

import torch
from pydantic import BaseModel, Field

from distill_core import parse_script_args
from shards import AugmentPolicy, Manifest, SkipCounter, augment, decode_image, iter_shard
from shards.build import build


class BenchData(BaseModel):
    n: int = Field(500, ge=1, description="images to augment per policy")


def main():
    args = parse_script_args(BenchData, __doc__)
    torch.set_num_threads(1)  # per-core figure
    with tempfile.TemporaryDirectory() as d:
        summary = build(d, demo="digits", shard_size=128)
        m = Manifest.load(d)
        raws = [r for s in m.shards("train")[:4] for r in iter_shard(f"{d}/{s.name}", SkipCounter())][: args.n]
        out = {"build_images_per_s": summary["images_per_s"]}
        for name, policy in (("demo32", m.policy()), ("deit224", AugmentPolicy())):
            images = [decode_image(r.data) for r in raws]
            for r, im in zip(raws[:20], images):  # warm-up: transform construction, imports
                augment(im, r.key, 1, policy)
            t0 = time.perf_counter()
            for r, im in zip(raws, images):
                augment(im, r.key, 0, policy)
            out[f"augment_{name}_images_per_s_per_core"] = round(len(raws) / (time.perf_counter() - t0), 1)
        print(json.dumps(out))


if __name__ == "__main__":
    main()
