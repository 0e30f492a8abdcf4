"""Webdataset shards, manifest, streaming reader with DDP splitting, and seeded augmentation."""

from .augment import AugmentPolicy, augment, decode_image, eval_view, sample_seed
from .manifest import Manifest, verify
from .stream import ShardStream, SkipCounter, iter_shard, make_loader, seeds_for_run, train_seed

__all__ = [
    "AugmentPolicy",
    "augment",
    "decode_image",
    "eval_view",
    "sample_seed",
    "Manifest",
    "verify",
    "ShardStream",
    "SkipCounter",
    "iter_shard",
    "make_loader",
    "seeds_for_run",
    "train_seed",
]
