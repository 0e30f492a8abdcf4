"""Where the service finds an image by key: an index of its shards' tar members.

The index maps each key to (shard, byte offset, size) from the tar headers, so an engine worker
reads one member with a seek, not a shard.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shards import Manifest
from shards.members import Member, scan_shard

log = logging.getLogger(__name__)


class ShardIndex:
    def __init__(self, directory: str | Path, splits: list[str]):
        self.directory = Path(directory)
        self.manifest = Manifest.load(directory)
        self.members: dict[str, Member] = {}
        for split in splits:
            if split not in self.manifest.splits:
                continue
            for shard in self.manifest.shards(split):
                found = 0
                for key, member in scan_shard(self.directory / shard.name):
                    self.members[key] = member
                    found += 1
                if found != shard.samples:
                    log.error("shard %s: %d images readable, the manifest says %d", shard.name, found, shard.samples)

    def __len__(self) -> int:
        return len(self.members)

    def get(self, key: str) -> Member | None:
        return self.members.get(key)
