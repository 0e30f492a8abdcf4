"""The service's labeling logic, without HTTP: store lookups, and cache misses sent to the engines.

`LabelService` is what the routes call; it can be driven in-process (tests, embedding) with a
`LocalEngine`, or across processes with `RemoteEngine`s. It raises the domain's errors (the
store's `StoreError`, the engine's `QueueFull` and `EngineError`); routes turn them into status
codes. Storing computed labels is the engine's job (its writer stores a batch before answering),
so a label the service returns as computed is already in the store unless the store failed.

Work is deduplicated within a request: the same (key, seed) asked twice is computed once and
answered twice. Uploads are labeled but never stored in the label store (any client could grow it
without bound): their labels live in a bounded LRU cache of each HTTP worker (`upload_cache`).
"""

from __future__ import annotations

import collections
import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
from fastapi.concurrency import run_in_threadpool

from labels.namespace import Namespace, RecordFormat
from labels.store import LabelStore, StoreError
from shards.decode import image_header
from shards.index import ShardIndex

from ..engine.contract import Job, check_fits
from ..metrics import Metrics
from .schemas import LabelsOut

log = logging.getLogger(__name__)


class InvalidUpload(ValueError):
    """An upload refused from its header: not an image, too many pixels, or a forged size."""


class UploadTooCostly(ValueError):
    """An upload whose pixels x seeds to compute exceed the per-request budget."""


@dataclass
class LabelService:
    store: LabelStore
    engines: object  # EngineRouter, RemoteEngine or LocalEngine: `await label(jobs) -> Result`
    index: ShardIndex | None
    namespace: Namespace
    fmt: RecordFormat
    metrics: Metrics
    refused_writes: bool = False  # the latest engine answer here was not stored: /readyz says so
    max_upload_work: int | None = None  # an upload's pixels x seeds to compute (its augmentation cost)
    upload_cache: int = 65536  # upload labels this worker remembers (least recently used go first)
    _uploads: collections.OrderedDict = field(default_factory=collections.OrderedDict, repr=False)

    def store_takes_writes(self) -> bool:
        """False while the store refuses writes: after an answer that was not stored, until a
        probe write (or a later stored answer) succeeds."""
        if self.refused_writes:
            try:
                self.store.probe_write()
                self.refused_writes = False
            except StoreError as e:
                log.warning("label store still refuses writes: %s", e)
        return not self.refused_writes

    def _empty(self, n: int) -> LabelsOut:
        rich = self.fmt.topk > 1 or self.fmt.probs
        return LabelsOut(
            namespace=self.namespace.id,
            labels=[None] * n,
            errors=[None] * n,
            topk=[None] * n if rich else None,
            probs=[None] * n if rich else None,
        )

    def _fill(self, out: LabelsOut, i: int, classes, probs) -> None:
        out.labels[i] = int(classes[0])
        if out.topk is not None:
            out.topk[i] = [int(c) for c in classes]
            out.probs[i] = [float(p) for p in probs]

    async def _from_store(self, keys: list[str], seeds: list[int], out: LabelsOut) -> list[int]:
        """Fill hits from the store; return the indexes that missed."""
        got = await run_in_threadpool(self.store.get, keys, seeds)
        probs = got.probs if got.probs is not None else np.ones_like(got.classes, dtype=np.float32)
        hits = np.flatnonzero(got.present)
        for i in hits:
            self._fill(out, i, got.classes[i], probs[i])
        out.cached = len(hits)
        self.metrics.cache_hits.inc(len(hits))
        return np.flatnonzero(~got.present).tolist()

    async def _compute(self, jobs: list[Job], items: list[list[list[int]]], out: LabelsOut):
        """Label `jobs` in an engine; `items[j][s]` are the answer's indexes of job j's seed s (a
        pair asked more than once is computed once). RequestTooLarge for more misses than an
        engine's whole queue: they could never fit. Returns the engine's Result."""
        check_fits(sum(len(j.seeds) for j in jobs), self.engines.info["max_queue_size"])  # before the socket
        result = await self.engines.label(jobs)
        flat = [idx for per_job in items for idx in per_job]
        computed = 0
        for r, indexes in enumerate(flat):
            if result.errors[r] is None:
                computed += 1
                for i in indexes:
                    self._fill(out, i, result.classes[r], result.probs[r])
            else:
                for i in indexes:
                    out.errors[i] = result.errors[r]
        out.computed += computed
        if all(j.store for j in jobs):
            self.refused_writes = not result.stored
            if not result.stored:  # answered (the labels are right), and said: they will be computed again
                out.unstored += computed
                self.metrics.labels_unstored.inc(computed)
                log.warning("%d labels computed but not stored: the label store refuses writes", computed)
        self.metrics.cache_misses.inc(computed)
        return result

    @staticmethod
    def _distinct(seeds_of: dict[int, int]) -> tuple[tuple[int, ...], list[list[int]]]:
        """{answer index: seed} -> (the distinct seeds, the answer indexes of each)."""
        by_seed: dict[int, list[int]] = {}
        for i, seed in seeds_of.items():
            by_seed.setdefault(seed, []).append(i)
        return tuple(by_seed), list(by_seed.values())

    async def _check_seeds(self, seeds: list[int]) -> None:
        """SeedOutOfRange for a seed past the namespace's range; the store is asked (the range may
        have grown) only for such a seed, off the event loop."""
        if seeds and max(seeds) >= self.store.seed_limit:
            await run_in_threadpool(self.store.check_seeds, seeds)

    async def lookup(self, keys: list[str], seeds: list[int]) -> LabelsOut:
        """Labels from the store only; None where missing."""
        await self._check_seeds(seeds)
        out = self._empty(len(keys))
        await self._from_store(keys, seeds, out)
        out.errors = None
        return out

    async def label(self, keys: list[str], seeds: list[int]) -> LabelsOut:
        """Cache-through: hits from the store; misses of indexed images labeled by an engine.
        Items whose key the service cannot read get a per-item error."""
        await self._check_seeds(seeds)
        out = self._empty(len(keys))
        misses = await self._from_store(keys, seeds, out)
        wanted = list(dict.fromkeys(keys[i] for i in misses))
        members = dict(zip(wanted, self.index.get_many(wanted) if self.index is not None else [None] * len(wanted)))
        by_key: dict[str, list[int]] = {}
        for i in misses:
            if members[keys[i]] is None:
                out.errors[i] = f"unknown key {keys[i]!r}" + ("" if self.index else " (service has no --shards)")
            else:
                by_key.setdefault(keys[i], []).append(i)
        if by_key:
            jobs, items = [], []
            for k, idx in by_key.items():
                distinct, indexes = self._distinct({i: seeds[i] for i in idx})
                jobs.append(Job(members[k], k, distinct))
                items.append(indexes)
            await self._compute(jobs, items, out)
        return out

    async def upload(self, data: bytes, seeds: list[int]) -> tuple[str, LabelsOut]:
        """Label an uploaded image under `seeds`; its key is upload/<sha256 of the bytes>."""
        await self._check_seeds(seeds)
        try:
            width, height = image_header(data)  # before anything is decoded or queued
        except ValueError as e:
            raise InvalidUpload(str(e)) from e
        key = "upload/" + hashlib.sha256(data).hexdigest()[:32]
        out = self._empty(len(seeds))
        misses = []
        for i, seed in enumerate(seeds):  # from this worker's upload cache, not the store
            hit = self._uploads.get((key, seed))
            if hit is None:
                misses.append(i)
            else:
                self._uploads.move_to_end((key, seed))
                self._fill(out, i, *hit)
                out.cached += 1
        self.metrics.cache_hits.inc(out.cached)
        distinct, indexes = self._distinct({i: seeds[i] for i in misses})
        work = width * height * len(distinct)
        if self.max_upload_work is not None and work > self.max_upload_work:
            raise UploadTooCostly(
                f"{width}x{height} pixels x {len(distinct)} seeds to compute = {work:,} > max_upload_work "
                f"{self.max_upload_work:,}; send fewer seeds per request or a smaller image"
            )
        if distinct:
            result = await self._compute([Job(data, key, distinct, store=False)], [indexes], out)
            for r, seed in enumerate(distinct):
                if result.errors[r] is None:
                    self._uploads[(key, seed)] = (result.classes[r], result.probs[r])
            while len(self._uploads) > self.upload_cache:
                self._uploads.popitem(last=False)
        return key, out
