"""Webdataset shards, manifest, streaming reader with DDP splitting, and seeded augmentation."""

from .augment import augment, cut_crop, eval_view
from .decode import decode_image
from .flags import DecoderFlag, RendererFlag, policy_overrides
from .manifest import Manifest, verify
from .policy import AugmentPolicy, sample_seed
from .schedule import RepeatSchedule
from .stream import ShardStream, SkipCounter, StreamOptions, iter_shard, make_loader

__all__ = [
    "AugmentPolicy",
    "RendererFlag",
    "DecoderFlag",
    "policy_overrides",
    "cut_crop",
    "augment",
    "decode_image",
    "eval_view",
    "sample_seed",
    "Manifest",
    "verify",
    "ShardStream",
    "StreamOptions",
    "SkipCounter",
    "iter_shard",
    "make_loader",
    "RepeatSchedule",
]
