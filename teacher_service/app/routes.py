"""REST routes: health, metrics, teacher info, label lookup (store only) and cache-through labeling."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from ..namespace import MAX_SEED
from ..store import StoreError
from .batcher import QueueFull
from .state import ServiceState

Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]
Key = Annotated[str, Field(min_length=1, max_length=512)]


class Items(BaseModel):
    """Columnar (key, seed) pairs: keys[i] with seeds[i]."""

    model_config = ConfigDict(extra="forbid")
    keys: list[Key]
    seeds: list[Seed]

    @model_validator(mode="after")
    def _same_length(self):
        if len(self.keys) != len(self.seeds):
            raise ValueError(f"keys ({len(self.keys)}) and seeds ({len(self.seeds)}) differ in length")
        return self


class LabelsOut(BaseModel):
    namespace: str
    labels: list[int | None]
    topk: list[list[int] | None] | None = None
    probs: list[list[float] | None] | None = None
    errors: list[str | None] | None = None
    cached: int = 0
    computed: int = 0


def state(request: Request) -> ServiceState:
    return request.app.state.svc


def require_token(request: Request) -> None:
    token = request.app.state.svc.settings.token
    if not token:
        return
    if request.headers.get("authorization", "") != f"Bearer {token}":
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


health = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])


@health.get("/healthz")
def healthz():
    return {"status": "ok"}


@health.get("/readyz")
def readyz(svc: ServiceState = Depends(state)):
    try:
        svc.store.get(["__readyz__"], [0])
    except StoreError as e:
        return JSONResponse({"status": "unavailable", "error": str(e)}, status_code=503)
    return {"status": "ready", "teacher": svc.teacher.teacher_id, "queue": svc.batcher.depth}


@health.get("/metrics")
def metrics(svc: ServiceState = Depends(state)):
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@v1.get("/teacher")
def teacher_info(svc: ServiceState = Depends(state)):
    t = svc.teacher
    return {
        "model": t.model_name,
        "teacher_id": t.teacher_id,
        "num_classes": t.num_classes,
        "classes": svc.classes,
        "input_size": [3, svc.policy.input_size, svc.policy.input_size],
        "policy": svc.policy.to_dict(),
        "policy_id": svc.policy.policy_id,
        "format": svc.fmt.name,
        "namespace": svc.namespace.id,
        "indexed_images": len(svc.index) if svc.index else 0,
    }


def _check_size(svc: ServiceState, n: int) -> None:
    if n > svc.settings.max_items:
        raise HTTPException(413, f"{n} items > max_items {svc.settings.max_items}")


def _fill(out: LabelsOut, svc: ServiceState, i: int, classes, probs) -> None:
    out.labels[i] = int(classes[0])
    if svc.fmt.topk > 1 or svc.fmt.probs:
        out.topk[i] = [int(c) for c in classes]
        out.probs[i] = [float(p) for p in probs]


def _empty(svc: ServiceState, n: int) -> LabelsOut:
    rich = svc.fmt.topk > 1 or svc.fmt.probs
    return LabelsOut(namespace=svc.namespace.id, labels=[None] * n, errors=[None] * n,
                     topk=[None] * n if rich else None, probs=[None] * n if rich else None)


async def _lookup(svc: ServiceState, keys: list[str], seeds: list[int], out: LabelsOut) -> list[int]:
    """Fill hits from the store; return the indexes that missed."""
    try:
        got = await run_in_threadpool(svc.store.get, keys, seeds)
    except StoreError as e:
        raise HTTPException(503, f"label store unavailable: {e}", headers={"Retry-After": "1"}) from e
    probs = got.probs if got.probs is not None else np.ones_like(got.classes, dtype=np.float32)
    for i in np.flatnonzero(got.present):
        _fill(out, svc, i, got.classes[i], probs[i])
    out.cached = int(got.present.sum())
    svc.metrics.cache_hits.inc(out.cached)
    return np.flatnonzero(~got.present).tolist()


@v1.post("/labels/lookup", response_model=LabelsOut, response_model_exclude_none=True)
async def lookup(items: Items, svc: ServiceState = Depends(state)):
    """Labels from the store only; null where missing. The trainer's fast path."""
    _check_size(svc, len(items.keys))
    out = _empty(svc, len(items.keys))
    await _lookup(svc, items.keys, items.seeds, out)
    out.errors = None
    return out


async def _compute(svc: ServiceState, job, groups: list[list[int]], keys, seeds, out: LabelsOut):
    """Run the crops of one augmentation job through the batcher, store the labels, fill `out`.

    `groups[j]` are the item indexes whose crops job j produced (one image, its seeds)."""
    crops, errors = await job
    where = []
    for idx, err in zip(groups, errors):
        if err is None:
            where.extend(idx)
        else:
            for i in idx:
                out.errors[i] = err
    if not where:
        return
    try:
        futures = svc.batcher.submit_many(list(crops.unbind(0)))
    except QueueFull as e:
        raise HTTPException(503, f"teacher queue full: {e}", headers={"Retry-After": svc.retry_after()}) from e
    results = await asyncio.gather(*futures)
    classes = np.array([r[0] for r in results])
    probs = np.array([r[1] for r in results], dtype=np.float32)
    for j, i in enumerate(where):
        _fill(out, svc, i, classes[j], probs[j])
    try:
        await run_in_threadpool(svc.store.put, [keys[i] for i in where], [seeds[i] for i in where], classes,
                                probs if svc.fmt.probs else None)
    except StoreError:
        svc.log.warning("labels computed but not stored (store unavailable)")
    out.computed = len(where)
    svc.metrics.cache_misses.inc(len(where))


def _reserve(svc: ServiceState, n: int) -> None:
    """Fail fast with 503 before any augmentation work when the queue cannot take n more items."""
    if svc.batcher.depth + n > svc.batcher.max_queue_size:
        svc.metrics.queue_rejected.inc(n)
        raise HTTPException(503, f"teacher queue full ({svc.batcher.depth} waiting)",
                            headers={"Retry-After": svc.retry_after()})


@v1.post("/labels", response_model=LabelsOut, response_model_exclude_none=True)
async def labels(items: Items, svc: ServiceState = Depends(state)):
    """Cache-through: hits from the store; misses augmented, batched, labeled, stored.

    Items whose key is not in the service's shards get a per-item error; when every item fails,
    the answer is 404 with the same body.
    """
    keys, seeds = items.keys, items.seeds
    _check_size(svc, len(keys))
    out = _empty(svc, len(keys))
    misses = await _lookup(svc, keys, seeds, out)
    by_key: dict[str, list[int]] = {}
    for i in misses:
        if svc.index is None or svc.index.get(keys[i]) is None:
            out.errors[i] = f"unknown key {keys[i]!r}" + ("" if svc.index else " (service has no --shards)")
        else:
            by_key.setdefault(keys[i], []).append(i)
    if by_key:
        _reserve(svc, sum(len(v) for v in by_key.values()))
        groups = list(by_key.values())
        job = svc.pool.members([(svc.index.get(k), k, [seeds[i] for i in idx]) for k, idx in by_key.items()])
        await _compute(svc, job, groups, keys, seeds, out)
    if keys and all(e is not None for e in out.errors):
        return JSONResponse(out.model_dump(exclude_none=True) | {"error": "no item could be labeled"}, status_code=404)
    return out


@v1.post("/labels/upload", response_model=LabelsOut, response_model_exclude_none=True)
async def labels_upload(
    image: UploadFile = File(..., description="encoded image (JPEG, PNG, ...)"),
    seeds: str = Form(..., description="comma-separated seeds, e.g. 0,1,2"),
    svc: ServiceState = Depends(state),
):
    """Label an uploaded image under seeds; the key is upload/<sha256 of the bytes>."""
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise HTTPException(422, "seeds must be comma-separated integers") from None
    if not seed_list or any(not 0 <= s <= MAX_SEED for s in seed_list):
        raise HTTPException(422, f"seeds must be 1+ integers in 0..{MAX_SEED}")
    _check_size(svc, len(seed_list))
    data = await image.read(svc.settings.max_upload_bytes + 1)
    if len(data) > svc.settings.max_upload_bytes:
        raise HTTPException(413, f"image larger than {svc.settings.max_upload_bytes} bytes")
    if not data:
        raise HTTPException(400, "empty image")
    key = "upload/" + hashlib.sha256(data).hexdigest()[:32]
    keys = [key] * len(seed_list)
    out = _empty(svc, len(seed_list))
    misses = await _lookup(svc, keys, seed_list, out)
    if misses:
        _reserve(svc, len(misses))
        job = svc.pool.upload(data, key, [seed_list[i] for i in misses])
        await _compute(svc, job, [misses], keys, seed_list, out)
        if any(e is not None for e in out.errors):
            raise HTTPException(400, out.errors[misses[0]])
    body = out.model_dump(exclude_none=True) | {"key": key}
    return JSONResponse(body)


def timed(endpoint: str, svc: ServiceState, start: float, code: int) -> None:
    svc.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - start)
    if code < 400:
        svc.metrics.request_success.labels(endpoint).inc()
    else:
        svc.metrics.request_failure.labels(endpoint, str(code)).inc()
