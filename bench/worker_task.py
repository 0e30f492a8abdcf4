"""An augmentation worker's task, in this process: microseconds per label; one JSON line.

    python bench/worker_task.py --input-size 32                # the demo digits (32 px PNGs)
    python bench/worker_task.py --data jpeg --input-size 224   # ImageNet-shaped JPEGs

Runs the label engine's `worker.run` (teacher_service/engine/worker.py) on tasks shaped like the
service's (one seed an image: a trainer's request) and like precompute's (`--seeds` an image),
each `--images` images in tasks of `--task-labels` crops, best of `--repeats`. Beside it, in the
same run, the same crops made image by image (decode one, make its crops, decode the next): the
order `worker.run` had before it decoded a task's images first. And the parts alone: reading an
image's bytes, decoding it, making a crop of an image decoded before.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from distill_core import parse_script_args
from shards import augment, decode_image
from shards.index import ShardIndex
from shards.members import OpenFiles
from teacher_service.engine import worker

from common import bench_shards


class WorkerTask(BaseModel):
    data: Literal["digits", "jpeg"] = Field("digits", description="demo digits or ImageNet-shaped JPEGs")
    input_size: int = Field(32, ge=8, description="crop size")
    images: int = Field(1024, ge=16, description="images of each measured pass")
    seeds: int = Field(4, ge=2, description="seeds an image of precompute-shaped tasks")
    task_labels: int = Field(64, ge=1, description="crops a task (a batch's share of one worker)")
    repeats: int = Field(3, ge=1, description="passes of each way; the best is kept")


def best_us_per_label(fn, labels: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return round(best / labels * 1e6, 1)


def main() -> None:
    args = parse_script_args(WorkerTask, __doc__)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        manifest, _ = bench_shards(args.data, Path(tmp) / "shards", n=args.images)
        policy = manifest.policy(input_size=args.input_size)
        index = ShardIndex.load(Path(tmp) / "shards", ["train"])
        keys = list(index.keys())[: args.images]
        members = index.get_many(keys)
        buf = torch.empty((args.task_labels, 3, args.input_size, args.input_size)).share_memory_()
        worker.init([buf], policy.to_json(), "augment", threading.Barrier(1))

        def tasks(seeds: int) -> list:
            per_task = max(1, args.task_labels // seeds)
            entries = [(members[i], keys[i], [(s, (i % per_task) * seeds + s) for s in range(seeds)])
                       for i in range(len(keys))]  # fmt: skip
            return [(0, entries[i : i + per_task]) for i in range(0, len(entries), per_task)]

        def run_all(ts: list) -> None:
            for t in ts:
                worker.run(t)

        files = OpenFiles()
        datas = [m.read(files) for m in members]
        images = [decode_image(d) for d in datas]

        def image_by_image() -> None:
            for m, k in zip(members, keys):
                buf[0].copy_(augment(decode_image(m.read(files)), k, 0, policy, restore_rng=False))

        n, r = len(keys), args.repeats
        one, many = tasks(1), tasks(args.seeds)
        figures = {
            "task_1_seed_us_per_label": best_us_per_label(lambda: run_all(one), n, r),
            "image_by_image_1_seed_us_per_label": best_us_per_label(image_by_image, n, r),
            f"task_{args.seeds}_seeds_us_per_label": best_us_per_label(lambda: run_all(many), n * args.seeds, r),
            "read_us_per_image": best_us_per_label(lambda: [m.read(files) for m in members], n, r),
            "decode_us_per_image": best_us_per_label(lambda: [decode_image(d) for d in datas], n, r),
            "crop_us_per_label": best_us_per_label(
                lambda: [augment(im, k, 0, policy, restore_rng=False) for im, k in zip(images, keys)], n, r
            ),
        }
        files.close()
    figures["task_vs_image_by_image"] = round(
        figures["image_by_image_1_seed_us_per_label"] / figures["task_1_seed_us_per_label"], 3
    )
    print(json.dumps({**figures, **args.model_dump()}))


if __name__ == "__main__":
    main()
