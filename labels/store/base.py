"""The label store interface and the row codec both backends share.

Layout: one *row* per (namespace, image key): a byte string of fixed-width slots, slot `s` holding
the record for seed `s`. A slot is `topk` little-endian uint16 class ids stored as class + 1
(0 = missing, so zero-filled gaps read as missing), followed by `topk` fp16 probabilities when
the format has them. A hard label is 2 bytes; a 300-epoch row is 600 bytes under one key.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from distill_core.secrets import redact  # noqa: F401 (every URL shown goes through it; re-exported)

from ..namespace import MAX_KEY_LENGTH, MAX_SEED, Namespace, RecordFormat

# Seeds a namespace serves when nobody said: DeiT's 300 epochs x 3 repeats fit, with room.
DEFAULT_SEED_LIMIT = 1024


class StoreError(RuntimeError):
    """Base class of label-store failures. Messages carry URLs through `redact`: never a password."""


class StoreUnavailable(StoreError):
    """The store could not be reached (after bounded retries). No labels were returned."""


def stored_seed_limit(value, namespace_id: str) -> int | None:
    """A namespace's stored seed range, read back: an integer in 1..MAX_SEED + 1, or a StoreError
    that says the record is damaged (an older `labels import` wrote a header's value unchecked)."""
    if value is None:
        return None
    try:
        text = value.decode() if isinstance(value, bytes) else str(value)
        limit = int(text)
    except (ValueError, UnicodeDecodeError):
        limit = None
    if limit is None or not 1 <= limit <= MAX_SEED + 1 or isinstance(value, bool | float):
        raise StoreError(
            f"namespace {namespace_id}'s seed range record holds {value!r}, not a seed count: it is damaged; "
            "export what the namespace holds, drop it and import it again"
        )
    return limit


class SeedOutOfRange(ValueError):
    """A seed beyond the range the namespace serves (what its precompute and schedule need)."""


@dataclass
class LabelBatch:
    """Labels for a batch of (key, seed) pairs; rows where `present` is False carry no label."""

    classes: np.ndarray  # int64 [n, topk], -1 where missing
    present: np.ndarray  # bool [n]
    probs: np.ndarray | None = None  # float32 [n, topk] or None
    unstored: int = 0  # from the service: labels computed for this batch that its store refused to keep

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


def validate_keys(keys) -> None:
    """Every key a string of 1..MAX_KEY_LENGTH characters: the service's rule, in every store."""
    for k in keys:
        if not isinstance(k, str) or not 0 < len(k) <= MAX_KEY_LENGTH:
            shown = repr(k)[:40] if not isinstance(k, str) else f"of {len(k)} characters"
            raise ValueError(f"a key must be a string of 1..{MAX_KEY_LENGTH} characters, not {shown}")


def validate_pairs(keys: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
    """The seeds as int64, after checking every pair: keys are strings of 1..MAX_KEY_LENGTH
    characters (the service's rule, everywhere), seeds integers in 0..MAX_SEED."""
    if len(keys) != len(seeds):
        raise ValueError(f"{len(keys)} keys but {len(seeds)} seeds")
    validate_keys(keys)
    if not isinstance(seeds, np.ndarray) and any(type(s) is not int and not isinstance(s, np.integer) for s in seeds):
        raise ValueError("seeds must be integers")
    if isinstance(seeds, np.ndarray) and len(seeds) and seeds.dtype.kind not in "iu":
        raise ValueError(f"seeds must be integers, not {seeds.dtype}")
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

    # -- seed range ----------------------------------------------------------------------
    seed_limit: int  # the namespace serves seeds 0 .. seed_limit - 1

    @abc.abstractmethod
    def _read_seed_limit(self) -> int | None:
        """The stored limit; None when the namespace has none recorded (made by an older version)."""

    @abc.abstractmethod
    def _extend_seed_limit(self, limit: int) -> int:
        """Raise the stored limit to at least `limit` (never lower it), atomically; return it."""

    def _init_seed_limit(self, create: bool, seed_limit: int | None) -> None:
        """A namespace is created serving at least DEFAULT_SEED_LIMIT seeds, what a service would
        give it: one whose range was evicted and is recreated by a small precompute does not
        shrink below that (and every writer restores at least its own range)."""
        stored = self._read_seed_limit()
        if stored is None:
            if not create:
                stored = MAX_SEED + 1  # an older store: no bound known, rows were bounded by MAX_SEED
            else:
                stored = self._extend_seed_limit(max(seed_limit or 0, DEFAULT_SEED_LIMIT))
        if seed_limit is not None and seed_limit > stored:
            stored = self._extend_seed_limit(seed_limit)
        self.seed_limit = stored

    def refresh_seed_limit(self) -> int:
        """Re-read the limit (another process, e.g. precompute, may have extended it)."""
        stored = self._read_seed_limit()
        if stored is not None:
            self.seed_limit = stored
        return self.seed_limit

    # -- what precompute has covered: the schedules (or seed ranges) its finished runs labeled ----
    def record_coverage(self, record: dict) -> None:
        """Remember that every label of `record` (a schedule: {"repeat_mode", "repeats", "epochs"},
        or {"seeds": B}: seeds 0..B-1 of every image) is stored; the trainer checks against these."""
        self._add_coverage(json.dumps(record, sort_keys=True))

    def coverage(self) -> list[dict]:
        """What `record_coverage` remembered; empty for a namespace no precompute finished."""
        return [json.loads(r) for r in self._read_coverage()]

    # -- the render fingerprint of the crops the labels were made from (shards/fingerprint.py) --
    def claim_fingerprint(self, record: dict) -> dict:
        """Store `record` as the namespace's render fingerprint unless it has one (the first
        writer's stands, atomically); return the one stored."""
        return json.loads(self._claim_fingerprint(json.dumps(record, sort_keys=True)))

    def fingerprint(self) -> dict | None:
        """The namespace's render fingerprint; None for labels made before fingerprints."""
        text = self._read_fingerprint()
        return json.loads(text) if text else None

    @abc.abstractmethod
    def _claim_fingerprint(self, record: str) -> str: ...

    @abc.abstractmethod
    def _read_fingerprint(self) -> str | None: ...

    @abc.abstractmethod
    def probe_write(self) -> None:
        """One small write that fails (StoreError) when the store refuses writes: a Redis at its
        memory limit under noeviction, a full disk."""

    @abc.abstractmethod
    def _add_coverage(self, record: str) -> None: ...

    @abc.abstractmethod
    def _read_coverage(self) -> list[str]: ...

    def check_seeds(self, seeds: Sequence[int]) -> None:
        """SeedOutOfRange unless every seed is inside the namespace's range (re-read once if not)."""
        top = max(seeds, default=-1)
        if top >= self.seed_limit and top >= self.refresh_seed_limit():
            raise SeedOutOfRange(
                f"seed {top} is outside namespace {self.namespace.id}'s range 0..{self.seed_limit - 1}; "
                f"precompute with --seeds 0:{top + 1} (or serve with --seed-limit {top + 1}) to extend it"
            )

    # -- hot path -------------------------------------------------------------------------
    def get(self, keys: Sequence[str], seeds: Sequence[int]) -> LabelBatch:
        """Labels of (key, seed) pairs; seeds outside the namespace's range read as missing.

        One fetch of the distinct images' rows; each label is cut out of the fetched bytes at its
        row's offset, so nothing larger than the rows themselves (each bounded by the seed limit)
        is allocated, however long any one row is."""
        s = validate_pairs(keys, seeds)
        w = self.codec.width
        slots = np.zeros((len(s), w), dtype=np.uint8)
        wanted = np.flatnonzero(s < self.seed_limit)
        if len(wanted):
            pos = {k: i for i, k in enumerate(dict.fromkeys(keys[i] for i in wanted))}
            rows = [r or b"" for r in self._get_rows(list(pos))]
            lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            ki = np.fromiter((pos[keys[i]] for i in wanted), dtype=np.int64, count=len(wanted))
            offset = s[wanted] * w
            stored = offset + w <= lengths[ki]  # past a row's end: missing
            src = starts[ki[stored]] + offset[stored]
            if len(src):
                buf = np.frombuffer(b"".join(rows), dtype=np.uint8)
                slots[wanted[stored]] = buf[src[:, None] + np.arange(w)[None, :]]
        return self.codec.decode(slots)

    def put(self, keys: Sequence[str], seeds: Sequence[int], classes, probs=None) -> int:
        """Write labels (idempotent: rewriting a label stores the same bytes). Returns count."""
        s = validate_pairs(keys, seeds)
        if not len(s):
            return 0
        self.check_seeds(s.tolist())
        classes = np.asarray(classes).reshape(len(s), -1)
        if (classes >= self.namespace.num_classes).any():
            raise ValueError(f"class id >= num_classes ({self.namespace.num_classes})")
        slots = self.codec.encode(classes, probs)
        self._put_runs(group_runs(list(keys), s, slots))
        return len(s)

    # -- rows: copy, stats ---------------------------------------------------------------
    def put_rows(self, rows: dict[str, bytes]) -> None:
        """Merge whole rows (present slots only), e.g. from another store."""
        validate_keys(rows)
        longest = max((len(r) for r in rows.values()), default=0) // self.codec.width
        self.check_seeds([longest - 1])
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
