"""`labels export` / `labels import`: a namespace as one self-describing NumPy file (.npz), so labels
move between sites without Redis, or into other frameworks (NumPy reads it; nothing of ours is needed).

The file holds, uncompressed names, compressed data (`np.savez_compressed`):

    header     a JSON string: {"format_version", "namespace": its metadata (teacher id, policy id,
               record format, class count and digest), "seed_limit", "coverage": what precompute
               recorded as done, "fingerprint": the render fingerprint of the crops the labels
               were made from (or null), "images", "labels"}
    keys       [N] str: the image keys, sorted
    key_index  [M] int32: each label's image, an index into `keys`
    seed       [M] int32: each label's augmentation seed
    classes    [M, k] int32: the teacher's top-k classes (k = 1 for hard labels)
    probs      [M, k] float16: their probabilities (topKp formats only)

Labels are listed image by image (in key order), seeds ascending, so two exports of the same
labels are the same arrays whichever store they came from. Export holds the arrays in memory:
about 14 bytes a label plus the keys (5 GB for ImageNet's 384 M labels of a 300-epoch run); it
writes a temporary file of its own and renames it, so an interrupted export leaves nothing, and it
writes to a new path or over a regular file only (never over a device, a FIFO or a symbolic link).

Import trusts nothing in the file. It reads only the members above, checks each member's declared
type and size before reading it, and reads the labels in chunks (memory: the keys plus one chunk).
Before the first write it checks the whole file: the header's fields and types, integer arrays,
every index, seed and class in range, keys that are strings the store accepts, labels in the
documented order (so no label is listed twice), and, when the namespace exists, that no label
differs from the stored one (a conflict refuses the import). A coverage record is kept only when
the file's labels bear it out. So a file that fails writes nothing.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from distill_core.files import atomic_write, check_target
from shards.fingerprint import adopt as adopt_fingerprint
from shards.fingerprint import validate as validate_fingerprint
from shards.schedule import REPEAT_MODES

from .namespace import MAX_KEY_LENGTH, MAX_SEED, Namespace
from .store import list_namespaces, open_existing, open_store, redact, resolved
from .store.file_store import path_from_url

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MEMBERS = ("header", "keys", "key_index", "seed", "classes", "probs")
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a header of 16 MB is already absurd (a few KB is normal)
MAX_KEYS = 100_000_000
MAX_LABELS = 10**11
CHUNK = 1_000_000  # labels read (and written) at a time
KEY_CHUNK = 16_384  # keys read at a time: at most 32 MB of the keys member (512 characters, 4 bytes each)
KEY_WINDOW = 65_536  # keys held at a time while labels are matched to them


def export_namespace(url: str, path: str | Path, namespace_id: str | None = None, progress: bool = True) -> dict:
    """Write one namespace of the store at `url` to `path` (.npz), atomically."""
    path = check_target(path)  # before the store is read: a device, a link or a folder is refused
    with open_existing(url, namespace_id) as store:
        k = store.namespace.format.topk
        rows: dict[str, bytes] = {}
        with tqdm(total=store.num_keys(), desc="read", unit="img", disable=not progress) as bar:
            for batch in store.iter_rows():
                rows.update((key, row) for key, row in batch if row)
                bar.update(len(batch))
        key_index, seeds, slots, keys = [], [], [], []
        width = store.codec.width
        for key in sorted(rows):  # keys with at least one label, each once
            row = rows[key]
            present = np.flatnonzero(store.codec.present_mask(row))
            if not len(present):
                continue
            i = len(keys)
            keys.append(key)
            cells = np.frombuffer(row[: len(row) // width * width], dtype=np.uint8).reshape(-1, width)
            key_index.append(np.full(len(present), i, dtype=np.int32))
            seeds.append(present.astype(np.int32))
            slots.append(cells[present])
        slots = np.concatenate(slots) if slots else np.zeros((0, width), dtype=np.uint8)
        decoded = store.codec.decode(slots)
        header = {
            "format_version": FORMAT_VERSION,
            "namespace": store.namespace.meta(),
            "seed_limit": store.refresh_seed_limit(),
            "coverage": store.coverage(),
            "fingerprint": store.fingerprint(),
            "images": len(keys),
            "labels": len(slots),
        }
        arrays = {
            "header": np.array(json.dumps(header)),
            "keys": np.array(keys, dtype=str),
            "key_index": np.concatenate(key_index) if key_index else np.zeros(0, dtype=np.int32),
            "seed": np.concatenate(seeds) if seeds else np.zeros(0, dtype=np.int32),
            "classes": decoded.classes.astype(np.int32).reshape(-1, k),
        }
        if decoded.probs is not None:
            arrays["probs"] = decoded.probs.astype(np.float16).reshape(-1, k)
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
    return {
        "store": redact(url),
        "file": str(path),
        "namespace": header["namespace"]["id"],
        "images": header["images"],
        "labels": header["labels"],
        "bytes": path.stat().st_size,
    }


# -- reading a file that may be anything ---------------------------------------------------------


class LabelFile:
    """An exported file's members, opened one stream each; nothing is read before it is asked
    for, and nothing is allocated before its declared size is checked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as e:
            raise ValueError(f"{self.path}: not a label export (not a complete .npz file: {e})") from e
        names = {n[:-4] for n in self.zip.namelist() if n.endswith(".npy")}
        if "header" not in names:
            self.zip.close()
            raise ValueError(f"{self.path}: not a label export (no header)")
        self.members = {n for n in names if n in MEMBERS}  # anything else is never read

    def close(self) -> None:
        self.zip.close()

    def __enter__(self) -> LabelFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self, name: str):
        """(stream positioned at the data, shape, dtype) of member `name`, its header checked:
        a plain C-order array of a dtype that holds no objects."""
        if name not in self.members:
            raise ValueError(f"{self.path}: damaged label export (no {name!r} array)")
        f = self.zip.open(name + ".npy")
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy version {version}")
        except ValueError as e:
            f.close()
            raise ValueError(f"{self.path}: damaged label export ({name}: {e})") from e
        if fortran or dtype.hasobject or dtype.fields is not None:
            f.close()
            raise ValueError(f"{self.path}: {name} must be a plain array, not {dtype} (no pickled objects)")
        return f, shape, dtype

    def read_all(self, name: str, max_bytes: int) -> np.ndarray:
        f, shape, dtype = self.open(name)
        with f:
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if size > max_bytes:
                raise ValueError(f"{self.path}: {name} declares {size:,} bytes (at most {max_bytes:,})")
            data = f.read(size)
        if len(data) != size:
            raise ValueError(f"{self.path}: damaged label export ({name} is cut short)")
        return np.frombuffer(data, dtype=dtype).reshape(shape)


def _integers(name: str, dtype: np.dtype, path: Path) -> None:
    if dtype.kind not in "iu":
        raise ValueError(f"{path}: {name} must hold integers, not {dtype} (no 1.7 read as 1)")


def _int_field(header: dict, name: str, low: int, high: int, path: Path) -> int:
    v = header.get(name)
    if type(v) is not int or not low <= v <= high:  # not bool, not 1e30, not 2048.5
        raise ValueError(f"{path}: header field {name!r} must be an integer in {low}..{high}, not {v!r}")
    return v


def _coverage_record(record, path: Path) -> dict:
    """A precompute record checked against its schema: {"seeds": B} or {"repeat_mode", "repeats",
    "epochs"} (and the `deit` mode's "schedule" version), with the node fields precompute adds:
    its part's "images" and "labels" counts and its shards' digests."""
    if not isinstance(record, dict):
        raise ValueError(f"{path}: a coverage record must be an object, not {record!r}")
    allowed = {"seeds", "repeat_mode", "repeats", "epochs", "schedule", "node_rank", "num_nodes", "images", "labels",
               "shards"}  # fmt: skip
    if set(record) - allowed:
        raise ValueError(f"{path}: coverage record with unknown fields {sorted(set(record) - allowed)}")
    shards = record.get("shards", {})
    if not isinstance(shards, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) == 16 and all(c in "0123456789abcdef" for c in v)
        for k, v in shards.items()
    ):
        raise ValueError(f"{path}: a coverage record's shards must map names to 16 hex digits")
    ints = {k: v for k, v in record.items() if k not in ("repeat_mode", "shards")}
    if any(type(v) is not int or v < 0 for v in ints.values()):
        raise ValueError(f"{path}: coverage record {record!r} must hold non-negative integers")
    if "seeds" in record:
        ok = set(record) <= {"seeds", "node_rank", "num_nodes"} and 1 <= record["seeds"] <= MAX_SEED + 1
    else:
        ok = (
            record.get("repeat_mode") in REPEAT_MODES and record.get("repeats", 0) >= 1 and record.get("epochs", 0) >= 1
        )
    nodes = record.get("num_nodes", 1)
    if not ok or nodes < 1 or record.get("node_rank", 0) >= nodes:
        raise ValueError(f"{path}: not a coverage record precompute writes: {record!r}")
    return record


def _header(lf: LabelFile) -> tuple[dict, Namespace]:
    data = lf.read_all("header", MAX_HEADER_BYTES)
    if data.shape != () or data.dtype.kind != "U":
        raise ValueError(f"{lf.path}: the header must be one string")
    try:
        header = json.loads(str(data[()]))
    except json.JSONDecodeError as e:
        raise ValueError(f"{lf.path}: the header is not JSON: {e}") from e
    except RecursionError:  # a header nested 200,000 levels deep: no traceback
        raise ValueError(f"{lf.path}: the header nests too deeply to be a label export's") from None
    if not isinstance(header, dict):
        raise ValueError(f"{lf.path}: the header must be a JSON object")
    if header.get("format_version") != FORMAT_VERSION or type(header.get("format_version")) is not int:
        raise ValueError(f"{lf.path}: label export version {header.get('format_version')!r} unsupported")
    try:
        namespace = Namespace.from_meta(header["namespace"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{lf.path}: the header's namespace is malformed: {type(e).__name__}: {e}") from e
    _int_field(header, "seed_limit", 1, MAX_SEED + 1, lf.path)
    _int_field(header, "images", 0, MAX_KEYS, lf.path)
    _int_field(header, "labels", 0, MAX_LABELS, lf.path)
    coverage = header.get("coverage", [])
    if not isinstance(coverage, list):
        raise ValueError(f"{lf.path}: the header's coverage must be a list")
    header["coverage"] = [_coverage_record(r, lf.path) for r in coverage]
    if header.get("fingerprint") is not None:
        validate_fingerprint(header["fingerprint"])
    return header, namespace


class _Keys:
    """The file's keys, read in chunks of KEY_CHUNK rows in their order, each chunk checked (strings,
    non-empty, sorted and unique across chunks); `get` hands out the keys of ascending rows,
    holding at most the window it was asked for and one chunk. So memory does not grow with the
    count or length of keys a file declares (a 1 MB file declaring a million keys of 256 characters
    peaked at 2.55 GB)."""

    def __init__(self, lf: LabelFile, header: dict):
        self.path = lf.path
        self.f, shape, self.dtype = lf.open("keys")
        if self.dtype.kind != "U" or len(shape) != 1:
            self.f.close()
            raise ValueError(f"{lf.path}: keys must be strings, not {self.dtype} (no bytes or integer keys)")
        if self.dtype.itemsize > 4 * MAX_KEY_LENGTH:
            self.f.close()
            raise ValueError(
                f"{lf.path}: keys of up to {self.dtype.itemsize // 4} characters (at most {MAX_KEY_LENGTH})"
            )
        if shape[0] != header["images"]:
            self.f.close()
            raise ValueError(f"{lf.path}: {shape[0]} keys but the header says {header['images']} images")
        self.n, self.read_rows, self.start, self.held, self.last = shape[0], 0, 0, [], None

    def __enter__(self) -> _Keys:
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def _chunk(self) -> list[str]:
        rows = min(KEY_CHUNK, self.n - self.read_rows)
        data = self.f.read(rows * self.dtype.itemsize)
        if len(data) != rows * self.dtype.itemsize:
            raise ValueError(f"{self.path}: damaged label export (keys is cut short)")
        keys = np.frombuffer(data, dtype=self.dtype)
        if (np.char.str_len(keys) == 0).any():
            raise ValueError(f"{self.path}: an empty key")
        chunk = keys.tolist()
        if (rows > 1 and not (keys[1:] > keys[:-1]).all()) or (self.last is not None and not chunk[0] > self.last):
            raise ValueError(f"{self.path}: keys must be sorted and unique (as export writes them)")
        self.read_rows += rows
        self.last = chunk[-1]
        return chunk

    def check_all(self) -> None:
        """Read and check every key, keeping none."""
        while self.read_rows < self.n:
            self._chunk()

    def get(self, rows: np.ndarray) -> list[str]:
        """The keys of `rows` (ascending, at most KEY_WINDOW apart, never below an earlier call's).
        Held: the keys of rows start .. read_rows - 1."""
        lo, hi = int(rows[0]), int(rows[-1])
        if lo >= self.read_rows:
            self.held, self.start = [], self.read_rows
        else:
            del self.held[: lo - self.start]
            self.start = lo
        while self.read_rows <= hi:
            self.held.extend(self._chunk())
            drop = min(max(0, lo - self.start), len(self.held))  # a chunk read wholly below lo
            del self.held[:drop]
            self.start += drop
        return [self.held[r - self.start] for r in rows.tolist()]


def _key_windows(ki: np.ndarray):
    """Slices of a chunk's (ascending) key rows, each spanning fewer than KEY_WINDOW keys."""
    at = 0
    while at < len(ki):
        end = int(np.searchsorted(ki, ki[at] + KEY_WINDOW, side="left"))
        yield slice(at, end)
        at = end


def _chunks(lf: LabelFile, header: dict, namespace: Namespace):
    """(key_index, seed, classes, probs or None) chunks of CHUNK labels, every value checked."""
    k, labels = namespace.format.topk, header["labels"]
    wanted = ["key_index", "seed", "classes"] + (["probs"] if namespace.format.probs else [])
    streams = {}
    try:
        for name in wanted:
            f, shape, dtype = lf.open(name)
            streams[name] = (f, dtype)
            rows = (labels, k) if name in ("classes", "probs") else (labels,)
            if tuple(shape) != rows:
                raise ValueError(f"{lf.path}: {name} has shape {tuple(shape)}, the header's labels need {rows}")
            if name == "probs":
                if dtype.kind != "f":
                    raise ValueError(f"{lf.path}: probs must be floats, not {dtype}")
            else:
                _integers(name, dtype, lf.path)
        for start in range(0, labels, CHUNK):
            n = min(CHUNK, labels - start)
            out = []
            for name in wanted:
                f, dtype = streams[name]
                width = k if name in ("classes", "probs") else 1
                data = f.read(n * width * dtype.itemsize)
                if len(data) != n * width * dtype.itemsize:
                    raise ValueError(f"{lf.path}: damaged label export ({name} is cut short)")
                a = np.frombuffer(data, dtype=dtype)
                out.append(a.reshape(n, k) if width > 1 or name in ("classes", "probs") else a)
            yield start, *out, *([None] if not namespace.format.probs else [])
    finally:
        for f, _ in streams.values():
            f.close()


def check_file(path: str | Path, url: str | None = None) -> dict:
    """Everything import checks before its first write (see the module docstring): the header,
    the keys and their order, every label; with `url`, conflicts with the labels stored there.
    Returns the header with the coverage records the labels bear out."""
    with LabelFile(path) as lf:
        header, namespace = _header(lf)
        with _Keys(lf, header) as keys:  # every key checked before any label, none kept
            keys.check_all()
        n, limit, classes = header["images"], header["seed_limit"], namespace.num_classes
        stored = open_store(url, namespace, create=False) if url and _holds(url, namespace) else None
        last = (-1, -1)
        count = np.zeros(n, dtype=np.int32)  # labels per key
        prefix = np.zeros(n, dtype=np.int32)  # of them, seeds 0, 1, 2, ... without a gap
        conflicts, example = 0, None
        try:
            with _Keys(lf, header) as lookup:
                for _, ki, seed, cls, probs in _chunks(lf, header, namespace):
                    ki, seed, cls = ki.astype(np.int64), seed.astype(np.int64), cls.astype(np.int64)
                    _in_range(lf.path, ki, seed, cls, probs, n, limit, classes)
                    order = np.concatenate([[last[0]], ki]) * (limit + 1) + np.concatenate([[last[1]], seed])
                    if (np.diff(order) <= 0).any():
                        raise ValueError(f"{lf.path}: labels must be listed key by key, seeds ascending, each once")
                    if not len(ki):
                        continue
                    last = (int(ki[-1]), int(seed[-1]))
                    first = np.r_[True, ki[1:] != ki[:-1]]  # each key's first label in the chunk
                    at = np.arange(len(ki))
                    rank = count[ki] + at - np.maximum.accumulate(np.where(first, at, 0))  # the key's n-th label
                    np.add.at(prefix, ki[seed == rank], 1)  # seeds ascend: the n-th is n while none is missing
                    np.add.at(count, ki, 1)
                    if stored is None:
                        continue
                    for rows in _key_windows(ki):
                        names = lookup.get(ki[rows])
                        have = stored.get(names, seed[rows].tolist())
                        differ = have.present & (have.classes[:, 0] != cls[rows, 0])
                        if differ.any():
                            conflicts += int(differ.sum())
                            i = int(np.flatnonzero(differ)[0])
                            example = example or (names[i], int(seed[rows][i]), int(have.classes[i, 0]),
                                                  int(cls[rows][i, 0]))  # fmt: skip
        finally:
            if stored is not None:
                stored.close()
        if conflicts:
            key, seed, was, new = example
            raise ValueError(
                f"{lf.path}: {conflicts} labels differ from the ones stored in {redact(url)} (e.g. {key} seed "
                f"{seed}: stored {was}, file {new}); nothing imported. Labels of one namespace are the same "
                "teacher on the same crops: a conflict means one side is wrong"
            )
        header["coverage"] = _borne_out(header["coverage"], count, prefix, path)
        header["coverage"] = _counts_borne_out(header["coverage"], count, path)
        return header


def _holds(url: str, namespace: Namespace) -> bool:
    """Whether the store at `url` has `namespace` (a file store that is not there has none)."""
    url = resolved(url)
    if ("://" not in url or url.startswith("file://")) and not path_from_url(url).exists():
        return False
    return any(m["id"] == namespace.id for m in list_namespaces(url))


def _in_range(path, ki, seed, cls, probs, n: int, limit: int, classes: int) -> None:
    if len(ki) and (ki.min() < 0 or ki.max() >= n):
        bad = int(ki[(ki < 0) | (ki >= n)][0])
        raise ValueError(f"{path}: key_index {bad} is out of 0..{n - 1} (no index may wrap around)")
    if len(seed) and (seed.min() < 0 or seed.max() >= limit):
        raise ValueError(f"{path}: a seed out of the header's range 0..{limit - 1}")
    if len(cls) and (cls.min() < 0 or cls.max() >= classes):
        raise ValueError(f"{path}: a class id out of 0..{classes - 1}")
    if probs is not None and len(probs):
        if not (np.isfinite(probs).all() and 0 <= probs.min() <= probs.max() <= 1):
            raise ValueError(f"{path}: probabilities must be in [0, 1]")


def _borne_out(records: list[dict], count: np.ndarray, prefix: np.ndarray, path) -> list[dict]:
    """The coverage records the file's labels bear out: {"seeds": B}: every image holds seeds
    0..B-1; a schedule: every image it holds has seeds 0..n-1 with n a multiple of its repeats.
    (`count`: each key's labels; `prefix`: how many of them are seeds 0, 1, ... without a gap.)"""
    kept = []
    for r in records:
        if "seeds" in r:
            ok = len(count) > 0 and bool((prefix >= r["seeds"]).all())
        else:
            held = count > 0
            ok = (
                bool(held.any())
                and bool((count[held] == prefix[held]).all())
                and bool((count[held] % r["repeats"] == 0).all())
            )
        if ok:
            kept.append(r)
        else:
            log.warning("%s: coverage record %s is not borne out by the file's labels: not imported", path, r)
    return kept


def _counts_borne_out(records: list[dict], count: np.ndarray, path) -> list[dict]:
    """Schedule records the file's counts bear out: their nodes' parts, summed, label no more than
    the file holds, and the file holds at least the share of their shards' images an epoch draws
    (1 / repeats of them: an epoch under repeated augmentation shows each drawn image `repeats`
    times). A schedule record says nothing about an image's seeds on its own (which epochs select
    an image depends on the shards), so it carries its counts ("images": its shards' images,
    "labels": what it labelled); one without them (written before 2026-12-07) is not imported: run
    precompute again to record it (it labels only what is missing)."""
    node_fields = ("node_rank", "num_nodes", "shards", "images", "labels")
    groups: dict[str, list[dict]] = {}
    for r in records:
        if "seeds" not in r:
            what = json.dumps({k: v for k, v in r.items() if k not in node_fields}, sort_keys=True)
            groups.setdefault(what, []).append(r)
    images, labels = int((count > 0).sum()), int(count.sum())
    dropped = []
    for group in groups.values():
        if any("images" not in r or "labels" not in r for r in group):
            why = "it carries no image and label counts (made before 2026-12-07)"
        else:
            claimed = sum(r["labels"] for r in group)
            drawn = sum(r["images"] // r["repeats"] for r in group)  # the fewest images its epochs drew
            if claimed <= labels and drawn <= images:
                continue
            why = f"its nodes labelled {claimed} labels of at least {drawn} images, the file holds {labels} of {images}"
        dropped += group
        log.warning("%s: coverage record %s is not imported: %s", path, group[0], why)
    return [r for r in records if not any(r is d for d in dropped)]


def import_namespace(path: str | Path, url: str, progress: bool = True) -> dict:
    """Merge an exported namespace into the store at `url` (created there if new), with its seed
    range, its render fingerprint and the precompute records its labels bear out. The whole file
    is checked first (`check_file`): a file that fails writes nothing."""
    header = check_file(path, url)
    namespace = Namespace.from_meta(header["namespace"])
    with LabelFile(path) as lf, _Keys(lf, header) as keys:
        with open_store(url, namespace, seed_limit=header["seed_limit"]) as store:
            adopt_fingerprint(store, header.get("fingerprint"), redact(url))  # refused before any label
            with tqdm(total=header["labels"], desc="import", unit="label", disable=not progress) as bar:
                for _, ki, seed, cls, probs in _chunks(lf, header, namespace):
                    ki = ki.astype(np.int64)
                    for rows in _key_windows(ki):
                        store.put(
                            keys.get(ki[rows]),
                            seed[rows].astype(np.int64),
                            cls[rows].astype(np.int64),
                            None if probs is None else probs[rows].astype(np.float32),
                        )
                    bar.update(len(seed))
            for record in header["coverage"]:
                store.record_coverage(record)
    return {
        "file": str(path),
        "store": redact(url),
        "namespace": namespace.id,
        "images": header["images"],
        "labels": header["labels"],
        "coverage": header["coverage"],
    }


def read_export(path: str | Path) -> dict:
    """The arrays of an exported file, its header parsed and checked (ValueError when it is not
    one); for NumPy users, who could also `np.load` it."""
    check_file(path)
    with np.load(path, allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files if name in MEMBERS}
    arrays["header"] = json.loads(str(arrays["header"]))
    return arrays
