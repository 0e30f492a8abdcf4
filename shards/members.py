"""Random access to the images of a shard: a member is (tar file, byte offset, size).

The label engine's workers and the trainer's loader read one image with one seek (the member
index, index.py, says where), so nothing streams whole shards through a pipe to use a few images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")  # sample fields that are images


class ShardChanged(ValueError):
    """An image's bytes are not the ones its index recorded: its shard was rewritten after it was
    built and labelled. Never skipped like an unreadable image: what would be read is not what was
    labelled under that key."""


def member_digest(data: bytes) -> bytes:
    """The digest the member index keeps of an image's bytes (blake2b-128)."""
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(frozen=True)
class Member:
    """Where an image's encoded bytes are: `size` bytes at `offset` of the tar file `path`; with
    `digest`, the bytes are checked against it when read (`key` names the image in the error)."""

    path: str
    offset: int
    size: int
    digest: bytes | None = None
    key: str | None = None

    def read(self, files: OpenFiles | None = None) -> bytes:
        """The member's bytes; with `files`, through its cache of open shard files. ShardChanged
        when they are not the bytes the index recorded."""
        if files is None:
            with open(self.path, "rb") as f:
                return self.read_from(f)
        return self.read_from(files.get(self.path))

    def read_from(self, f) -> bytes:
        f.seek(self.offset)
        data = f.read(self.size)
        if len(data) != self.size:
            raise ValueError(f"{self.path} is truncated at offset {self.offset}")
        if self.digest is not None and member_digest(data) != self.digest:
            raise ShardChanged(
                f"shard {self.path} changed after it was indexed: the bytes of image {self.key!r} (offset "
                f"{self.offset}) are not the ones its index recorded, so its labels belong to other pixels; "
                "restore the shard, or build the shards again and precompute their labels"
            )
        return data


class OpenFiles:
    """The most recently used shard files, kept open: a worker reading image after image of the
    same shards saves an open and a close per image."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self.files: dict[str, object] = {}

    def get(self, path: str):
        f = self.files.pop(path, None)
        if f is None:
            f = open(path, "rb")
            if len(self.files) >= self.limit:
                self.files.pop(next(iter(self.files))).close()
        self.files[path] = f  # most recent last
        return f

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()
