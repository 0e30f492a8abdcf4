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
about 14 bytes a label plus the keys (5 GB for ImageNet's 384 M labels of a 300-epoch run).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shards.fingerprint import adopt as adopt_fingerprint
from shards.fingerprint import validate as validate_fingerprint

from .namespace import Namespace
from .store import open_existing, open_store, redact

FORMAT_VERSION = 1


def export_namespace(url: str, path: str | Path, namespace_id: str | None = None, progress: bool = True) -> dict:
    """Write one namespace of the store at `url` to `path` (.npz), atomically."""
    path = Path(path)
    with open_existing(url, namespace_id) as store:
        k = store.namespace.format.topk
        rows: dict[str, bytes] = {}
        with tqdm(total=store.num_keys(), desc="read", unit="img", disable=not progress) as bar:
            for batch in store.iter_rows():
                rows.update((key, row) for key, row in batch if row)
                bar.update(len(batch))
        keys = sorted(rows)
        key_index, seeds, slots = [], [], []
        width = store.codec.width
        for i, key in enumerate(keys):
            row = rows[key]
            present = np.flatnonzero(store.codec.present_mask(row))
            if not len(present):
                continue
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
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return {
        "store": redact(url),
        "file": str(path),
        "namespace": header["namespace"]["id"],
        "images": header["images"],
        "labels": header["labels"],
        "bytes": path.stat().st_size,
    }


def read_export(path: str | Path) -> dict:
    """The arrays of an exported file, its header parsed (ValueError when it is not one)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files}
    if "header" not in arrays:
        raise ValueError(f"{path}: not a label export (no header)")
    header = json.loads(str(arrays.pop("header")))
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: label export version {header.get('format_version')} unsupported")
    m = len(arrays["seed"])
    if len(arrays["key_index"]) != m or len(arrays["classes"]) != m or header["labels"] != m:
        raise ValueError(f"{path}: damaged label export (its arrays disagree on the label count)")
    return {"header": header, **arrays}


def import_namespace(path: str | Path, url: str, chunk: int = 200_000, progress: bool = True) -> dict:
    """Merge an exported namespace into the store at `url` (created there if new; labels already
    present are rewritten with the same bytes), with its seed range and precompute records."""
    data = read_export(path)
    header = data["header"]
    namespace = Namespace.from_meta(header["namespace"])
    keys, key_index, seeds = data["keys"], data["key_index"], data["seed"]
    classes, probs = data["classes"], data.get("probs")
    fingerprint = header.get("fingerprint")
    if fingerprint is not None:
        validate_fingerprint(fingerprint)
    with open_store(url, namespace, seed_limit=header["seed_limit"]) as store:
        adopt_fingerprint(store, fingerprint, redact(url))  # before any label: refused, nothing written
        with tqdm(total=len(seeds), desc="import", unit="label", disable=not progress) as bar:
            for a in range(0, len(seeds), chunk):
                b = min(a + chunk, len(seeds))
                store.put(
                    keys[key_index[a:b]].tolist(),
                    seeds[a:b],
                    classes[a:b],
                    None if probs is None else probs[a:b].astype(np.float32),
                )
                bar.update(b - a)
        for record in header["coverage"]:
            store.record_coverage(record)
    return {
        "file": str(path),
        "store": redact(url),
        "namespace": namespace.id,
        "images": header["images"],
        "labels": len(seeds),
    }
