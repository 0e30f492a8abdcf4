"""The member index: where each image of a split is, without reading a tar header.

`shards build` (or `shards index DIR` for shards built before it) writes one file per split,
`<split>.index`, next to the manifest, which records its size and sha256 like a shard's. It
holds, per image in stored order (shard by shard): the key, the byte offset and size of the
encoded image in its tar, the class label and a digest of the image's bytes; and a table of 64-bit
key hashes, sorted, for lookups by key. Every read through the index checks the image's bytes
against their digest (`Member.read`), so an image whose shard was rewritten after it was built
(and labelled) is refused by name, never read as another image's pixels: the manifest checks the
index, the index checks each image, at a cost per image read (a blake2b of its bytes), none at
start-up. Readers map the file (`mmap`), so opening it costs a checksum, not a walk over
the data, and the processes of one machine share its pages.

Layout: magic, a little-endian u64 header length, a JSON header (version, split, the shards it
indexes with their counts, sizes and checksums, and each array's offset), then the arrays, each
at an offset aligned to 8 bytes:

    hash   u64 [n]  blake2b-64 of each key, ascending
    order  u32 [n]  the row of each sorted hash
    offset u64 [n]  byte offset of the image in its shard (rows in stored order)
    size   u32 [n]  its size in bytes
    label  i32 [n]  its class (-1 when the sample has none)
    key_end u64 [n] end of each row's key in `keys`
    digest u8  [n, 16] blake2b-128 of each image's bytes (version 2)
    keys   u8  [*]  the keys, UTF-8, back to back

Every reader needs it (the stream, precompute, the service, the fingerprint): shards built before
indexes are refused with one message (`missing`) that says how to write it once, `shards index
DIR`, which walks their tar headers (`SplitIndex.scan_rows`) and writes the same bytes a build does.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import mmap
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

from .manifest import Manifest, ShardInfo, cut_short, sha256_file, wrong_size
from .members import IMAGE_KEYS, Member, member_digest

log = logging.getLogger(__name__)

MAGIC = b"DLSHIDX\x01"
INDEX_VERSION = 2  # 2: a digest of every image's bytes
DIGEST_BYTES = 16
_ARRAYS = (("hash", "<u8"), ("order", "<u4"), ("offset", "<u8"), ("size", "<u4"), ("label", "<i4"), ("key_end", "<u8"))


def missing(directory: str | Path, split: str) -> str:
    """The one message for a split without a member index, wherever it is needed."""
    return (
        f"split {split} of {directory} has no member index (shards built before indexes): write it once with "
        f"`python -m shards index {directory}`"
    )


class IndexMismatch(ValueError):
    """An index that does not describe the shards the manifest lists (damaged, stale, foreign)."""


def _aligned(n: int) -> int:
    return -(-n // 8) * 8


def _shard_record(s: ShardInfo) -> dict:
    return {"name": s.name, "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256}


def index_name(split: str) -> str:
    return f"{split}.index"


def key_hash(keys: Iterable[str]) -> np.ndarray:
    """blake2b-64 of each key: the index's lookup table is these, sorted."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys), dtype=np.uint64
    )


def scan_members(path: str | Path) -> Iterator[tuple[str, int, int, int]]:
    """(key, image offset, image size, label) of each sample of one shard in stored order, from
    its tar headers and its small `cls` members. Keys are split as webdataset splits them when
    streaming (`base_plus_ext`), so a key here is the key a trainer asks for. Python's tarfile
    ends iteration quietly at a damaged header after the first; callers compare the count with
    the manifest's."""
    with tarfile.open(path, "r:") as tf:
        current, image, label = None, None, -1
        for ti in tf:
            key, ext = base_plus_ext(ti.name) if ti.isreg() else (None, None)
            if key is None:
                continue
            if key != current:
                if image is not None:
                    yield current, *image, label
                current, image, label = key, None, -1
            if ext in IMAGE_KEYS and image is None:
                image = (ti.offset_data, ti.size)
            elif ext == "cls":
                try:
                    label = int(tf.extractfile(ti).read())
                except ValueError:
                    label = -1
        if image is not None:
            yield current, *image, label


class SplitIndex:
    """The members of one split's shards, by row (stored order) or by key."""

    def __init__(self, directory: str | Path, buffer, header: dict, source: str | None = None):
        self.directory = Path(directory)
        self.header = header
        self.source = source  # the index file, or None for one scanned into memory
        self._buffer = buffer
        arrays, n = header["arrays"], header["samples"]
        base = _aligned(len(MAGIC) + 8 + header["length"])
        for name, dtype in _ARRAYS:
            setattr(self, name, np.frombuffer(buffer, dtype=dtype, count=n, offset=base + arrays[name]))
        self.digest = np.frombuffer(buffer, np.uint8, count=n * DIGEST_BYTES, offset=base + arrays["digest"])
        self.digest = self.digest.reshape(n, DIGEST_BYTES)
        self.keys = np.frombuffer(buffer, dtype=np.uint8, count=header["key_bytes"], offset=base + arrays["keys"])
        self.shards = [s["name"] for s in header["shards"]]
        self.starts = [0]
        for s in header["shards"]:
            self.starts.append(self.starts[-1] + s["samples"])
        self._paths = [str(self.directory / name) for name in self.shards]

    # -- building ------------------------------------------------------------------------
    @staticmethod
    def encode(split: str, shards: list[ShardInfo], rows: list[tuple[str, int, int, int, bytes]]) -> bytes:
        """The index file's bytes for `rows` (key, offset, size, label, digest of the image's bytes),
        the samples of `shards` in stored order."""
        keys = [r[0] for r in rows]
        if len(set(keys)) != len(keys):
            seen: set[str] = set()
            dup = next(k for k in keys if k in seen or seen.add(k))
            raise IndexMismatch(f"split {split}: key {dup!r} names two samples; keys must be unique")
        hashes = key_hash(keys)
        order = np.argsort(hashes, kind="stable")
        blob = b"".join(k.encode() for k in keys)
        columns = {
            "hash": hashes[order],
            "order": order.astype("<u4"),
            "offset": np.array([r[1] for r in rows], dtype="<u8"),
            "size": np.array([r[2] for r in rows], dtype="<u4"),
            "label": np.array([r[3] for r in rows], dtype="<i4"),
            "key_end": np.cumsum([len(k.encode()) for k in keys], dtype=np.uint64).astype("<u8"),
            "digest": np.frombuffer(b"".join(r[4] for r in rows), dtype=np.uint8),
        }
        arrays, at = {}, 0  # offsets from the end of the header, each aligned to 8 bytes
        for name in [*(n for n, _ in _ARRAYS), "digest"]:
            arrays[name] = at
            at = _aligned(at + columns[name].nbytes)
        arrays["keys"] = at
        header = {
            "version": INDEX_VERSION,
            "split": split,
            "samples": len(rows),
            "key_bytes": len(blob),
            "shards": [_shard_record(s) for s in shards],
            "arrays": arrays,
        }
        text = json.dumps(header).encode()
        head = MAGIC + len(text).to_bytes(8, "little") + text
        out = io.BytesIO()
        out.write(head + b"\0" * (_aligned(len(head)) - len(head)))
        base = out.tell()
        for name in [*(n for n, _ in _ARRAYS), "digest"]:
            out.write(b"\0" * (base + arrays[name] - out.tell()))
            out.write(columns[name].tobytes())
        out.write(b"\0" * (base + arrays["keys"] - out.tell()))
        out.write(blob)
        return out.getvalue()

    @classmethod
    def scan_rows(
        cls, directory: str | Path, split: str, shards: list[ShardInfo]
    ) -> list[tuple[str, int, int, int, bytes]]:
        """Every sample of `shards` from their tar headers, with the digest of its image's bytes;
        IndexMismatch naming the shards whose headers end before their manifest count (or that are
        missing or resized)."""
        rows, problems = [], []
        for shard in shards:
            if problem := wrong_size(directory, shard):
                problems.append(problem)
                continue
            path = Path(directory) / shard.name
            found = list(scan_members(path))
            if problem := cut_short(shard, len(found)):
                problems.append(problem)
            with open(path, "rb") as f:
                for key, offset, size, label in found:
                    rows.append((key, offset, size, label, member_digest(Member(str(path), offset, size).read_from(f))))
        if problems:
            raise IndexMismatch(
                f"shards of split {split} in {directory} do not match their manifest ({'; '.join(problems)}); "
                f"check them with `python -m shards inspect {directory}`"
            )
        return rows

    @classmethod
    def from_bytes(cls, directory: str | Path, data, source: str | None = None) -> SplitIndex:
        if bytes(data[: len(MAGIC)]) != MAGIC:
            raise IndexMismatch(f"{source or 'index'}: not a shard index (bad magic)")
        n = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 8], "little")
        try:
            header = json.loads(bytes(data[len(MAGIC) + 8 : len(MAGIC) + 8 + n]))
            header["length"] = n
        except ValueError as e:
            raise IndexMismatch(f"{source or 'index'}: unreadable header ({e})") from None
        if header.get("version") != INDEX_VERSION:
            directory_hint = Path(source).parent if source else "DIR"
            raise IndexMismatch(
                f"{source}: index version {header.get('version')}, this code reads {INDEX_VERSION} (version 2 "
                f"holds a digest of every image, checked at every read): write it again with "
                f"`python -m shards index {directory_hint}`"
            )
        try:
            return cls(directory, data, header, source)
        except (KeyError, TypeError, ValueError) as e:
            raise IndexMismatch(f"{source or 'index'}: damaged ({e!r})") from None

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path, split: str, manifest: Manifest) -> SplitIndex:
        """The split's index file, checked against the manifest: its size and sha256, and the
        shards it was made for (a worker process that gets it pickled maps it without checking
        again: `__setstate__`). IndexMismatch when it does not match or is gone."""
        info = manifest.indexes[split]
        path = Path(directory) / info.name
        if not path.exists():
            raise IndexMismatch(
                f"{info.name}, which the manifest lists, is missing: run `python -m shards index {directory}`"
            )
        size = path.stat().st_size
        if size != info.bytes:
            raise IndexMismatch(f"{info.name}: {size} bytes, the manifest says {info.bytes} (damaged?)")
        if (digest := sha256_file(path)) != info.sha256:
            raise IndexMismatch(f"{info.name}: sha256 {digest[:12]}.. != manifest {info.sha256[:12]}.. (modified)")
        with open(path, "rb") as f:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        index = cls.from_bytes(directory, buffer, str(path))
        listed = [_shard_record(s) for s in manifest.shards(split)]
        if index.header["shards"] != listed or index.header["samples"] != info.samples:
            raise IndexMismatch(
                f"{info.name} indexes other shards than the manifest lists: run `python -m shards index {directory}`"
            )
        return index

    @classmethod
    def load(cls, directory: str | Path, split: str, manifest: Manifest | None = None) -> SplitIndex:
        """The split's index, checked (`open`); IndexMismatch with `missing`'s message when the
        shards have none."""
        manifest = manifest or Manifest.load(directory)
        if split not in manifest.indexes:
            manifest.shards(split)  # KeyError for a split that is not there at all
            raise IndexMismatch(missing(directory, split))
        return cls.open(directory, split, manifest)

    def __getstate__(self):  # to worker processes: the file's path (mapped again there) or the bytes
        data = None if self.source else bytes(self._buffer)
        return {"directory": str(self.directory), "source": self.source, "data": data}

    def __setstate__(self, state):
        if state["data"] is not None:
            other = SplitIndex.from_bytes(state["directory"], state["data"])
        else:  # checked by the process that opened it first
            with open(state["source"], "rb") as f:
                buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            other = SplitIndex.from_bytes(state["directory"], buffer, state["source"])
        self.__dict__.update(other.__dict__)

    # -- reading -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.header["samples"]

    @property
    def nbytes(self) -> int:
        return len(self._buffer)

    def key(self, row: int) -> str:
        start = int(self.key_end[row - 1]) if row else 0
        return bytes(self.keys[start : int(self.key_end[row])]).decode()

    def find(self, key: str) -> int | None:
        """The row of `key`, or None."""
        return self.find_many([key])[0]

    def find_many(self, keys: Sequence[str]) -> list[int | None]:
        """The row of each key, or None: one hash pass, one sorted search and one gather of the
        candidates' key spans for them all (a service request asks for dozens of keys)."""
        n = len(self.hash)
        if not n or not keys:
            return [None] * len(keys)
        hashes = key_hash(keys)
        first = np.searchsorted(self.hash, hashes)
        at = np.minimum(first, n - 1)
        hit = (first < n) & (self.hash[at] == hashes)
        rows = self.order[at].astype(np.int64)
        ends = self.key_end[rows]
        starts = np.where(rows > 0, self.key_end[np.maximum(rows - 1, 0)], 0)
        found: list[int | None] = []
        columns = (hit, hashes, first, rows, starts, ends)
        for key, hit_, h, j, row, a, b in zip(keys, *(c.tolist() for c in columns)):
            if not hit_:
                found.append(None)
            elif self.keys[a:b].tobytes() == key.encode():
                found.append(row)
            else:  # another key with the same 64-bit hash: the ones after it decide
                found.append(self._find_from(key, h, j + 1))
        return found

    def _find_from(self, key: str, h: int, j: int) -> int | None:
        while j < len(self.hash) and int(self.hash[j]) == h:
            row = int(self.order[j])
            if self.key(row) == key:
                return row
            j += 1
        return None

    def shard_of(self, row: int) -> int:
        return bisect.bisect_right(self.starts, row) - 1

    def member(self, row: int, key: str | None = None) -> Member:
        """Where row's image is, with the digest its bytes are checked against when read (`key`:
        the row's key, when the caller has it)."""
        path = self._paths[self.shard_of(row)]
        key = self.key(row) if key is None else key
        return Member(path, int(self.offset[row]), int(self.size[row]), self.digest[row].tobytes(), key)

    def get(self, key: str) -> Member | None:
        row = self.find(key)
        return None if row is None else self.member(row)

    def shard_rows(self, shard: int) -> range:
        """The rows of the split's `shard`-th shard (manifest order)."""
        return range(self.starts[shard], self.starts[shard + 1])

    def members(self, shard: int) -> Iterator[tuple[str, Member]]:
        """(key, member) of the images of the split's `shard`-th shard, in stored order."""
        for row in self.shard_rows(shard):
            yield self.key(row), self.member(row)

    def iter_keys(self) -> Iterator[str]:
        blob = bytes(self.keys)
        ends = self.key_end.tolist()
        start = 0
        for end in ends:
            yield blob[start:end].decode()
            start = end


def write_index(directory: str | Path, split: str, manifest: Manifest) -> ShardInfo:
    """Write `<split>.index` (atomically) from the shards' tar headers and return its manifest entry."""
    directory = Path(directory)
    shards = manifest.shards(split)
    rows = SplitIndex.scan_rows(directory, split, shards)
    data = SplitIndex.encode(split, shards, rows)
    path = directory / index_name(split)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return ShardInfo(name=path.name, samples=len(rows), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def index_all(directory: str | Path, verify: bool = True, progress: bool = True) -> dict:
    """`shards index DIR`: write the member index of every split (checking each shard's checksum
    first unless verify=False) and record them in the manifest."""
    from tqdm import tqdm

    from .manifest import verify_shard

    directory = Path(directory)
    manifest = Manifest.load(directory)
    all_shards = [s for shards in manifest.splits.values() for s in shards]
    if verify:
        bar = tqdm(all_shards, desc="verify", unit="shard", disable=not progress)
        problems = [p for s in bar if (p := verify_shard(directory, s))]
        if problems:
            raise IndexMismatch(f"not indexing damaged shards: {'; '.join(problems)}")
    for split in manifest.splits:
        manifest.indexes[split] = write_index(directory, split, manifest)
    manifest.save(directory)
    return {
        "dir": str(directory),
        "indexes": {k: {"file": v.name, "samples": v.samples, "bytes": v.bytes} for k, v in manifest.indexes.items()},
        "verified": verify,
    }


class ShardIndex:
    """Where the service finds an image by key, across the splits it serves."""

    def __init__(self, splits: dict[str, SplitIndex]):
        self.splits = splits

    @classmethod
    def load(cls, directory: str | Path, splits: list[str]) -> ShardIndex:
        """The index of `splits` (those the manifest has), checked against the manifest: a damaged
        index, or shards of another size than the manifest says, raise IndexMismatch naming them."""
        manifest = Manifest.load(directory)
        found = {s: SplitIndex.load(directory, s, manifest) for s in splits if s in manifest.splits}
        problems = [p for split in found for shard in manifest.shards(split) if (p := wrong_size(directory, shard))]
        if problems:
            raise IndexMismatch(
                f"shards in {directory} do not match their manifest ({'; '.join(problems)}); "
                f"check them with `python -m shards inspect {directory}`"
            )
        return cls(found)

    def __len__(self) -> int:
        return sum(len(s) for s in self.splits.values())

    def get(self, key: str) -> Member | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[Member | None]:
        """The member of each key (None where no split has it), each split searched once for the
        keys the ones before it lacked."""
        found: list[Member | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for index in self.splits.values():
            if not todo:
                break
            rows = index.find_many([keys[i] for i in todo])
            for i, row in zip(todo, rows):
                if row is not None:
                    found[i] = index.member(row, keys[i])
            todo = [i for i, row in zip(todo, rows) if row is None]
        return found

    def keys(self) -> Iterator[str]:
        for index in self.splits.values():
            yield from index.iter_keys()
