"""Random access to the images of a shard: a member is (tar file, byte offset, size).

The label engine's workers and the trainer's loader read one image with one seek (the member
index, index.py, says where), so nothing streams whole shards through a pipe to use a few images.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")  # sample fields that are images


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
