"""The label store interface and the row codec both backends share.

Layout: one *row* per (namespace, image key): a byte string of fixed-width slots, slot `s` holding
the record for seed `s`. A slot is `topk` little-endian uint16 class ids stored as class + 1
(0 = missing, so zero-filled gaps read as missing), followed by `topk` fp16 probabilities when
the format has them. A hard label is 2 bytes; a 300-epoch row is 600 bytes under one key.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..namespace import MAX_SEED, Namespace, RecordFormat


class StoreError(RuntimeError):
    """Base class of label-store failures."""


class StoreUnavailable(StoreError):
    """The store could not be reached (after bounded retries). No labels were returned."""


@dataclass
class LabelBatch:
    """Labels for a batch of (key, seed) pairs; rows where `present` is False carry no label."""

    classes: np.ndarray  # int64 [n, topk], -1 where missing
    present: np.ndarray  # bool [n]
    probs: np.ndarray | None = None  # float32 [n, topk] or None

    @property
    def top1(self) -> np.ndarray:
        return self.classes[:, 0]

    def __len__(self) -> int:
        return len(self.present)


class RowCodec:
    def __init__(self, fmt: RecordFormat):
        self.fmt = fmt
        self.width = fmt.slot_bytes

    def encode(self, classes: np.ndarray, probs: np.ndarray | None) -> np.ndarray:
        """[n, k] classes (+ probs) -> [n, width] uint8 slots."""
        classes = np.asarray(classes).reshape(len(classes), -1)
        if classes.shape[1] != self.fmt.topk:
            raise ValueError(f"format {self.fmt.name} stores {self.fmt.topk} classes per label, got {classes.shape[1]}")
        if (classes < 0).any() or (classes >= 2**16 - 1).any():
            raise ValueError("class ids must be in 0..65534")
        ids = (classes.astype(np.uint16) + 1).astype("<u2")
        parts = [ids.view(np.uint8).reshape(len(ids), -1)]
        if self.fmt.probs:
            if probs is None:
                raise ValueError(f"format {self.fmt.name} needs probabilities")
            p = np.asarray(probs, dtype="<f2").reshape(len(ids), self.fmt.topk)
            parts.append(p.view(np.uint8).reshape(len(ids), -1))
        return np.ascontiguousarray(np.concatenate(parts, axis=1))

    def decode(self, slots: np.ndarray) -> LabelBatch:
        """[n, width] uint8 -> LabelBatch (missing where the first class id is 0)."""
        n, k = len(slots), self.fmt.topk
        ids = np.ascontiguousarray(slots[:, : 2 * k]).view("<u2").astype(np.int64) - 1
        present = ids[:, 0] >= 0
        probs = None
        if self.fmt.probs:
            probs = np.ascontiguousarray(slots[:, 2 * k : 4 * k]).view("<f2").astype(np.float32)
        return LabelBatch(classes=ids.reshape(n, k), present=present, probs=probs)

    def present_mask(self, row: bytes | np.ndarray) -> np.ndarray:
        a = np.frombuffer(row, dtype=np.uint8) if isinstance(row, (bytes, bytearray, memoryview)) else row
        a = a[: len(a) // self.width * self.width].reshape(-1, self.width)
        return (a[:, 0] | a[:, 1]) != 0

    def runs(self, row: bytes) -> list[tuple[int, bytes]]:
        """(byte offset, bytes) of each run of present slots: what a merge must write."""
        mask = self.present_mask(row)
        if not mask.any():
            return []
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.view(np.int8), [0]])))
        return [
            (int(a) * self.width, bytes(row[a * self.width : b * self.width])) for a, b in zip(edges[::2], edges[1::2])
        ]

    def merge(self, old: bytes | None, new: bytes) -> bytes:
        """Present slots of `new` over `old`; missing slots of `new` never erase."""
        if not old:
            return new
        size = max(len(old), len(new))
        out = np.zeros(size, dtype=np.uint8)
        out[: len(old)] = np.frombuffer(old, dtype=np.uint8)
        n = np.frombuffer(new, dtype=np.uint8)
        mask = np.repeat(self.present_mask(new), self.width)
        out[: len(n)][mask] = n[mask]
        return out.tobytes()


def validate_pairs(keys: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
    if len(keys) != len(seeds):
        raise ValueError(f"{len(keys)} keys but {len(seeds)} seeds")
    s = np.asarray(seeds, dtype=np.int64).reshape(-1)
    if len(s) and (s.min() < 0 or s.max() > MAX_SEED):
        raise ValueError(f"seeds must be in 0..{MAX_SEED}")
    return s


def group_runs(keys: Sequence[str], seeds: np.ndarray, slots: np.ndarray) -> dict[str, list[tuple[int, bytes]]]:
    """Per key, (byte offset, bytes) runs of consecutive seeds: one write per run, not per label."""
    width = slots.shape[1]
    order = sorted(range(len(keys)), key=lambda i: (keys[i], seeds[i]))
    out: dict[str, list[tuple[int, bytes]]] = {}
    i = 0
    while i < len(order):
        j = i
        while (
            j + 1 < len(order) and keys[order[j + 1]] == keys[order[i]] and seeds[order[j + 1]] == seeds[order[j]] + 1
        ):
            j += 1
        idx = order[i : j + 1]
        out.setdefault(keys[order[i]], []).append((int(seeds[order[i]]) * width, slots[idx].tobytes()))
        i = j + 1
    return out


class LabelStore(abc.ABC):
    """Bulk label I/O for one namespace. One round trip per call on the hot path."""

    url: str
    namespace: Namespace

    def __init__(self, namespace: Namespace):
        self.namespace = namespace
        self.codec = RowCodec(namespace.format)

    # -- hot path -------------------------------------------------------------------------
    def get(self, keys: Sequence[str], seeds: Sequence[int]) -> LabelBatch:
        s = validate_pairs(keys, seeds)
        if not len(s):
            return self.codec.decode(np.zeros((0, self.codec.width), np.uint8))
        uniq = list(dict.fromkeys(keys))
        rows = [r or b"" for r in self._get_rows(uniq)]
        w = self.codec.width
        # Vectorized slicing: rows padded into one [unique keys, max row] array, then indexed.
        length = max(max(map(len, rows)), w)
        table = np.frombuffer(b"".join(r.ljust(length, b"\0") for r in rows), dtype=np.uint8).reshape(len(rows), length)
        pos = {k: i for i, k in enumerate(uniq)}
        ki = np.fromiter((pos[k] for k in keys), dtype=np.int64, count=len(keys))
        beyond = s * w + w > length  # seeds past the end of a row: missing
        cols = np.where(beyond, 0, s)[:, None] * w + np.arange(w)[None, :]
        slots = table[ki[:, None], cols]
        slots[beyond] = 0
        return self.codec.decode(slots)

    def put(self, keys: Sequence[str], seeds: Sequence[int], classes, probs=None) -> int:
        """Write labels (idempotent: rewriting a label stores the same bytes). Returns count."""
        s = validate_pairs(keys, seeds)
        if not len(s):
            return 0
        classes = np.asarray(classes).reshape(len(s), -1)
        if (classes >= self.namespace.num_classes).any():
            raise ValueError(f"class id >= num_classes ({self.namespace.num_classes})")
        slots = self.codec.encode(classes, probs)
        self._put_runs(group_runs(list(keys), s, slots))
        return len(s)

    # -- rows: copy, stats ---------------------------------------------------------------
    def put_rows(self, rows: dict[str, bytes]) -> None:
        """Merge whole rows (present slots only), e.g. from another store."""
        self._put_runs({k: self.codec.runs(r) for k, r in rows.items() if self.codec.present_mask(r).any()})

    @abc.abstractmethod
    def _get_rows(self, keys: list[str]) -> list[bytes | None]: ...

    @abc.abstractmethod
    def _put_runs(self, runs: dict[str, list[tuple[int, bytes]]]) -> None: ...

    @abc.abstractmethod
    def iter_rows(self, batch: int = 1000) -> Iterator[list[tuple[str, bytes]]]:
        """All (key, row) of the namespace, in batches."""

    @abc.abstractmethod
    def num_keys(self) -> int: ...

    @abc.abstractmethod
    def drop(self) -> int:
        """Delete the namespace: every row and its metadata. Returns the rows deleted."""

    @abc.abstractmethod
    def bytes_used(self) -> int: ...

    def close(self) -> None:  # noqa: B027 (an optional hook: a store may hold nothing to release)
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
