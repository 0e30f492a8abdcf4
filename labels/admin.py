"""`labels stats`, `copy`, `export` and `import`: look inside a store, move a namespace between
stores or through a file (`label_files.py`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from distill_core import Command, Positional
from distill_core.secrets import SecretURL
from shards import Manifest
from shards.fingerprint import adopt as adopt_fingerprint

from .namespace import classes_digest
from .quality import label_quality
from .store import LabelStore, list_namespaces, open_existing, open_store, redact

log = logging.getLogger(__name__)


def coverage_runs(per_seed: np.ndarray) -> list[list[int]]:
    """[[first seed, last seed + 1, images labeled], ...] for runs of equal coverage."""
    runs: list[list[int]] = []
    for s, c in enumerate(per_seed.tolist()):
        if c and runs and runs[-1][1] == s and runs[-1][2] == c:
            runs[-1][1] = s + 1
        elif c:
            runs.append([s, s + 1, c])
    return runs


def namespace_stats(store: LabelStore, progress: bool = True) -> dict:
    per_seed = np.zeros(0, dtype=np.int64)
    keys = 0
    total = store.num_keys()
    with tqdm(total=total, desc=f"scan {store.namespace.id}", unit="img", disable=not progress) as bar:
        for rows in store.iter_rows():
            for _, row in rows:
                mask = store.codec.present_mask(row or b"")
                if len(mask) > len(per_seed):
                    per_seed = np.pad(per_seed, (0, len(mask) - len(per_seed)))
                per_seed[: len(mask)] += mask
                keys += 1
            bar.update(len(rows))
    labels = int(per_seed.sum())
    used = store.bytes_used()
    fp = store.fingerprint()
    return {
        "namespace": store.namespace.meta(),
        # the crops the labels were made from (shards/fingerprint.py): what every trainer checks
        "fingerprint": {k: fp.get(k) for k in ("sha256", "made_by", "device", "decoder", "versions")} if fp else None,
        "images": keys,
        "labels": labels,
        "seeds_with_labels": int((per_seed > 0).sum()),
        "coverage": coverage_runs(per_seed),
        "bytes": used,
        "bytes_per_label": round(used / labels, 3) if labels else None,
    }


def stats(
    url: str,
    namespace_id: str | None = None,
    progress: bool = True,
    shards: str | None = None,
    quality_labels: int = 20_000,
) -> dict:
    """Every namespace's figures; with `shards`, also the label quality of those of its classes
    (labels/quality.py: how often the teacher's label is the image's class, by crop scale)."""
    metas = list_namespaces(url)
    if namespace_id:
        metas = [m for m in metas if m["id"].startswith(namespace_id)]
    digest = classes_digest(Manifest.load(shards).classes) if shards else None
    out = []
    for m in metas:
        with open_existing(url, m["id"]) as store:
            entry = namespace_stats(store, progress)
            if digest and store.namespace.classes_digest == digest and quality_labels:
                try:
                    entry["label_quality"] = label_quality(store, shards, max_labels=quality_labels)
                except ValueError as e:  # no fingerprint record (the policy is unknown), another policy
                    entry["label_quality"] = {"error": str(e)}
            out.append(entry)
    summary = {"url": redact(url), "namespaces": out}
    if url.startswith(("redis://", "rediss://")):
        from .store.redis_store import orphaned_rows

        orphans = orphaned_rows(url)
        if orphans:  # rows whose namespace record was evicted: restored by the next write to them
            summary["orphaned_rows"] = orphans
            for nsid, n in orphans.items():
                log.warning(
                    "%d label rows of namespace %s have no namespace record (evicted?); run precompute or serve "
                    "with the same teacher, policy and format once to restore it (any write does), and give "
                    "Redis maxmemory-policy noeviction",
                    n,
                    nsid,
                )
    return summary


def copy(src_url: str, dst_url: str, namespace_id: str | None = None, batch: int = 1000, progress: bool = True) -> dict:
    """Merge a namespace's labels from src into dst (present labels only; idempotent)."""
    with (
        open_existing(src_url, namespace_id) as src,
        open_store(dst_url, src.namespace, seed_limit=src.seed_limit) as dst,
    ):
        adopt_fingerprint(dst, src.fingerprint(), redact(dst_url))
        keys = labels = 0
        with tqdm(total=src.num_keys(), desc="copy", unit="img", disable=not progress) as bar:
            for rows in src.iter_rows(batch):
                payload = {k: r for k, r in rows if r}
                dst.put_rows(payload)
                keys += len(payload)
                labels += int(sum(src.codec.present_mask(r).sum() for r in payload.values()))
                bar.update(len(rows))
        return {
            "src": redact(src_url),
            "dst": redact(dst_url),
            "namespace": src.namespace.id,
            "images": keys,
            "labels": labels,
        }


class StatsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Annotated[SecretURL, Positional()] = Field(
        description="store URL: redis://host:port/db, rediss://..., file:///path.db or a path (or env:NAME, @FILE)"
    )
    namespace: str | None = Field(None, description="namespace id (or a prefix of it) to report; default all")
    shards: str | None = Field(
        None,
        description="shards the labels are of: adds label quality (how often the teacher's label is the image's "
        "class, by crop scale) to the namespaces of their classes",
    )
    quality_labels: int = Field(20_000, ge=0, description="labels sampled for the label quality")
    progress: bool = Field(True, description="progress bar")


class CopyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    src: Annotated[SecretURL, Positional()] = Field(description="store URL to copy from (or env:NAME, @FILE)")
    dst: Annotated[SecretURL, Positional()] = Field(
        description="store URL to merge into (e.g. a Redis cluster; or env:NAME, @FILE)"
    )
    namespace: str | None = Field(None, description="namespace id (or a prefix); required when SRC holds several")
    progress: bool = Field(True, description="progress bar")


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Annotated[SecretURL, Positional()] = Field(description="store URL to export from (or env:NAME, @FILE)")
    out: Annotated[Path, Positional()] = Field(description="the .npz file to write")
    namespace: str | None = Field(None, description="namespace id (or a prefix); required when URL holds several")
    progress: bool = Field(True, description="progress bar")


class ImportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: Annotated[Path, Positional()] = Field(description="a file `labels export` wrote")
    url: Annotated[SecretURL, Positional()] = Field(
        description="store URL to merge its labels into (or env:NAME, @FILE)"
    )
    progress: bool = Field(True, description="progress bar")


def _export(c: ExportConfig) -> dict:
    from .files import export_namespace

    return export_namespace(c.url, c.out, c.namespace, progress=c.progress)


def _import(c: ImportConfig) -> dict:
    from .files import import_namespace

    return import_namespace(c.file, c.url, progress=c.progress)


COMMAND = Command(
    "labels",
    help="inspect and move label stores",
    commands=[
        Command(
            "stats",
            help="counts, coverage per seed and bytes of each namespace in a store",
            config=StatsConfig,
            run=lambda c: stats(c.url, c.namespace, c.progress, c.shards, c.quality_labels),
        ),
        Command(
            "copy",
            help="merge one namespace's labels from SRC into DST (e.g. file store -> Redis)",
            config=CopyConfig,
            run=lambda c: copy(c.src, c.dst, c.namespace, progress=c.progress),
        ),
        Command(
            "export",
            help="write one namespace to a self-describing NumPy file (.npz): metadata, keys, seeds, labels",
            config=ExportConfig,
            run=_export,
        ),
        Command(
            "import",
            help="merge a file `labels export` wrote into a store (the namespace is created if new)",
            config=ImportConfig,
            run=_import,
        ),
    ],
)
