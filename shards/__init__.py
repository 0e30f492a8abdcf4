"""Webdataset shards, manifest, streaming reader with DDP splitting, and seeded augmentation."""

from .augment import augment, eval_view, prepare
from .decode import decode_image
from .flags import DecoderFlag, RendererFlag, policy_overrides
from .manifest import Manifest, verify
from .policy import AugmentPolicy, sample_seed
from .schedule import RepeatSchedule
from .stream import ShardStream, SkipCounter, iter_shard, make_loader

__all__ = [
    "AugmentPolicy",
    "RendererFlag",
    "DecoderFlag",
    "policy_overrides",
    "prepare",
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
    "RepeatSchedule",
]
