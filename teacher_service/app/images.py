"""Where the service gets crops: an index of its shards and a pool of augmentation processes.

The index maps each key to (shard, byte offset, size) from the tar headers, so a request reads one
member with a seek, not a shard. Decoding and augmentation are CPU work that holds the GIL and the
process-wide RNG; they run in worker processes so the event loop and the batcher stay free.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from shards import Manifest
from shards.stream import IMAGE_KEYS


@dataclass(frozen=True)
class Member:
    path: str
    offset: int
    size: int


class ShardIndex:
    def __init__(self, directory: str | Path, splits: list[str]):
        self.directory = Path(directory)
        self.manifest = Manifest.load(directory)
        self.members: dict[str, Member] = {}
        for split in splits:
            if split not in self.manifest.splits:
                continue
            for shard in self.manifest.shards(split):
                self._index(self.directory / shard.name)

    def _index(self, path: Path) -> None:
        """Tar headers only: keys split exactly as webdataset splits them when streaming."""
        with tarfile.open(path, "r:") as tf:
            for ti in tf:
                key, ext = base_plus_ext(ti.name) if ti.isreg() else (None, None)
                if key is not None and ext in IMAGE_KEYS:
                    self.members[key] = Member(str(path), ti.offset_data, ti.size)

    def __len__(self) -> int:
        return len(self.members)

    def get(self, key: str) -> Member | None:
        return self.members.get(key)


@lru_cache(maxsize=8)
def _policy(policy_json: str):
    from shards import AugmentPolicy

    return AugmentPolicy.from_json(policy_json)


def _augment_bytes(data: bytes, key: str, seeds: list[int], policy_json: str):
    """Crops as a torch tensor: torch's multiprocessing reductions hand it over in shared memory,
    so the service process neither copies nor unpickles 600 KB per 224 px crop."""
    import torch

    from shards import augment_many, decode_image

    torch.set_num_threads(1)
    return augment_many(decode_image(data), key, seeds, _policy(policy_json))


def _augment_member(member: Member, key: str, seeds: list[int], policy_json: str):
    with open(member.path, "rb") as f:
        f.seek(member.offset)
        data = f.read(member.size)
    return _augment_bytes(data, key, seeds, policy_json)


def _augment_members(jobs: list[tuple[Member, str, list[int]]], policy_json: str):
    """Many images in one task: one round trip and one shared tensor per request, not per crop.
    Returns (crops [n, 3, H, W] for the readable images, per-job error or None)."""
    import torch

    crops, errors = [], []
    for member, key, seeds in jobs:
        try:
            crops.append(_augment_member(member, key, seeds, policy_json))
            errors.append(None)
        except ValueError as e:  # undecodable image: an error for its items, not the request
            errors.append(str(e))
    return (torch.cat(crops) if crops else None), errors


def _warm(policy_json: str) -> int:
    _policy(policy_json).train_transform()
    return os.getpid()


class AugmentPool:
    """Augment (image, key, seeds) in worker processes; one decode per image per request."""

    def __init__(self, policy_json: str, workers: int):
        self.policy_json = policy_json
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def warm(self) -> None:
        list(self.pool.map(_warm, [self.policy_json] * self.workers))

    async def members(self, jobs: list[tuple[Member, str, list[int]]]):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, _augment_members, jobs, self.policy_json)

    async def upload(self, data: bytes, key: str, seeds: list[int]):
        loop = asyncio.get_running_loop()
        try:
            crops = await loop.run_in_executor(self.pool, _augment_bytes, data, key, seeds, self.policy_json)
        except ValueError as e:
            return None, [str(e)]
        return crops, [None]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
