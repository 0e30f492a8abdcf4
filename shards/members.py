"""Random access to the images of a shard: (key, tar member) from the tar headers alone.

The label engine's workers read one image with one seek, so neither the service nor precompute
streams whole shards through a pipe. Keys are split exactly as webdataset splits them when
streaming (`base_plus_ext`), so a key here is the key a trainer asks for.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from .stream import IMAGE_KEYS


@dataclass(frozen=True)
class Member:
    """Where an image's encoded bytes are: `size` bytes at `offset` of the tar file `path`."""

    path: str
    offset: int
    size: int

    def read(self, files: OpenFiles | None = None) -> bytes:
        """The member's bytes; with `files`, through its cache of open shard files."""
        if files is None:
            with open(self.path, "rb") as f:
                return self._read_from(f)
        return self._read_from(files.get(self.path))

    def _read_from(self, f) -> bytes:
        f.seek(self.offset)
        data = f.read(self.size)
        if len(data) != self.size:
            raise ValueError(f"{self.path} is truncated at offset {self.offset}")
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


def scan_shard(path: str | Path) -> Iterator[tuple[str, Member]]:
    """(key, image member) of one shard in stored order, reading tar headers only.

    Python's tarfile ends iteration quietly at a damaged header after the first; callers that
    know the expected count (the manifest) compare against it."""
    with tarfile.open(path, "r:") as tf:
        for ti in tf:
            key, ext = base_plus_ext(ti.name) if ti.isreg() else (None, None)
            if key is not None and ext in IMAGE_KEYS:
                yield key, Member(str(path), ti.offset_data, ti.size)
