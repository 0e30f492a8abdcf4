"""How good are the labels the distillation head learns? On the training crops themselves: how often
the teacher's hard label for (image, seed) is the image's own class, overall and by crop scale (the
share of the source image the crop covers; DeiT's crops cover 8% to 100%).

A disagreement is not always the teacher's mistake: a crop of 8% of an image can show only
background, or another object. That is DeiT's argument for labels computed on the crop. This
figure shows how far the two targets apart, at each scale.

The figure comes from a fixed, spread-out sample of the store's labels (`max_labels`; each image
with every seed the store holds for it), so it costs the same on the demo and on ImageNet: the
image headers of the sampled images are read from the shards, the crop boxes drawn from their
seeds (`shards.crop_box`), no image is decoded.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np

from shards import AugmentPolicy, Manifest
from shards.augment import crop_box
from shards.decode import image_header
from shards.index import SplitIndex
from shards.members import OpenFiles

from .store import LabelStore

SCALE_EDGES = (0.25, 0.5, 0.75)  # bins: [0, .25), [.25, .5), [.5, .75), [.75, 1]
SCALE_BINS = ("<0.25", "0.25-0.5", "0.5-0.75", ">=0.75")
CHUNK = 256  # images per store lookup


def store_policy(store: LabelStore) -> AugmentPolicy:
    """The augmentation policy the store's labels were made with (its fingerprint record holds it)."""
    fp = store.fingerprint() or {}
    if "policy" not in fp:
        raise ValueError(f"namespace {store.namespace.id} has no fingerprint record: its policy is not known")
    return AugmentPolicy.from_dict(fp["policy"])


def label_quality(
    store: LabelStore,
    shards: str | Path,
    split: str = "train",
    policy: AugmentPolicy | None = None,
    max_labels: int = 20_000,
) -> dict:
    """{"labels", "images", "agree_pct", "by_crop_scale": {bin: {"labels", "agree_pct"}}} over a
    sample of up to about `max_labels` of the store's labels for `shards`' `split` (the images'
    classes from the shard index); see the module docstring."""
    directory = Path(shards)
    manifest = Manifest.load(directory)
    index = SplitIndex.load(directory, split, manifest)
    policy = policy or store_policy(store)
    if policy.policy_id != store.namespace.policy_id:
        raise ValueError(
            f"policy {policy.policy_id} is not the one of namespace {store.namespace.id} ({store.namespace.policy_id})"
        )
    seeds = np.arange(store.seed_limit)
    order = np.random.default_rng(0).permutation(len(index))  # fixed and spread over every shard
    agree = np.zeros(len(SCALE_BINS), dtype=np.int64)
    total = np.zeros(len(SCALE_BINS), dtype=np.int64)
    images = 0
    files = OpenFiles()
    try:
        for at in range(0, len(order), CHUNK):
            if total.sum() >= max_labels:
                break
            rows = order[at : at + CHUNK]
            keys = [index.key(int(r)) for r in rows]
            got = store.get(np.repeat(keys, len(seeds)).tolist(), np.tile(seeds, len(rows)).tolist())
            present = got.present.reshape(len(rows), len(seeds))
            top1 = got.top1.reshape(len(rows), len(seeds))
            for i, row in enumerate(rows.tolist()):
                cls = int(index.label[row])
                if cls < 0 or not present[i].any():
                    continue
                images += 1
                width, height = image_header(index.member(row).read(files))
                for s in np.flatnonzero(present[i]).tolist():
                    _, _, h, w = crop_box(policy, keys[i], s, width, height)
                    b = bisect.bisect_right(SCALE_EDGES, h * w / (width * height))
                    total[b] += 1
                    agree[b] += int(top1[i, s]) == cls
    finally:
        files.close()
    n = int(total.sum())
    return {
        "split": split,
        "labels": n,
        "images": images,
        "agree_pct": round(100 * int(agree.sum()) / n, 2) if n else None,
        "by_crop_scale": {
            name: {"labels": int(t), "agree_pct": round(100 * int(a) / int(t), 2)}
            for name, t, a in zip(SCALE_BINS, total, agree)
            if t
        },
    }
