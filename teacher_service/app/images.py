"""Where the service finds an image by key: an index of its shards' tar members.

The index maps each key to (shard, byte offset, size) from the tar headers, so an engine worker
reads one member with a seek, not a shard. It is checked against the manifest as it is built: a
shard that is missing, has another size, or whose tar headers end before its manifest count (a
damaged header ends tarfile's iteration quietly) stops the service from starting, with the
shards named. `serve` builds it once and hands it to its HTTP workers as a file.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

from shards import Manifest
from shards.members import Member, scan_shard

log = logging.getLogger(__name__)

INDEX_ENV = "DISTILL_SHARD_INDEX"  # set by `serve` for its HTTP workers; not a user setting


class ShardIndex:
    def __init__(self, directory: str | Path, members: dict[str, Member]):
        self.directory = Path(directory)
        self.members = members

    @classmethod
    def build(cls, directory: str | Path, splits: list[str]) -> ShardIndex:
        directory = Path(directory)
        manifest = Manifest.load(directory)
        members: dict[str, Member] = {}
        problems = []
        for split in splits:
            if split not in manifest.splits:
                continue
            for shard in manifest.shards(split):
                path = directory / shard.name
                if not path.exists() or path.stat().st_size != shard.bytes:
                    size = path.stat().st_size if path.exists() else "no"
                    problems.append(f"{shard.name}: {size} bytes, the manifest says {shard.bytes}")
                    continue
                found = 0
                for key, member in scan_shard(path):
                    members[key] = member
                    found += 1
                if found != shard.samples:
                    problems.append(f"{shard.name}: {found} images readable, the manifest says {shard.samples}")
        if problems:
            raise ValueError(
                f"shards in {directory} do not match their manifest ({'; '.join(problems)}); "
                f"check them with `python -m shards inspect {directory}`"
            )
        return cls(directory, members)

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:
            pickle.dump((str(self.directory), self.members), f, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def load(cls, path: str | Path) -> ShardIndex:
        with open(path, "rb") as f:  # written by this service's own supervisor, in its private directory
            directory, members = pickle.load(f)
        return cls(directory, members)

    def __len__(self) -> int:
        return len(self.members)

    def get(self, key: str) -> Member | None:
        return self.members.get(key)
