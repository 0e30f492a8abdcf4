"""Label store throughput and size; prints one JSON line per backend.

python bench/store.py [--redis-url redis://127.0.0.1:6379/15] [--images 2000] [--seeds 300]
python bench/store.py --backends redis,redis_cluster      # one Redis vs a local 3-master cluster
python bench/store.py --epochs 300 --repeats 3            # the pairs DeiT's 300-epoch schedule asks for

The store is shaped like a 300-epoch run: every image has a label for every seed (`--seeds`), or,
with `--epochs`, exactly the seeds that run's schedule asks each image for (`shards/schedule.py`:
about E/R selections of R seeds each, on shards of `--shard-size` images). Labels follow
what a teacher produces: per image one dominant class (85% of crops), the rest spread over 1000
classes. Gets and puts are batches of 256 random (key, seed) pairs from one client on loopback.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import redis
from pydantic import BaseModel, Field

from distill_core import parse_script_args
from shards import RepeatSchedule
from teacher_service.namespace import Namespace, RecordFormat
from teacher_service.store import open_store

from common import LocalRedisCluster


def teacher_like_labels(rng, images: int, seeds: int, classes: int = 1000) -> np.ndarray:
    dominant = rng.integers(0, classes, size=(images, 1))
    other = rng.integers(0, classes, size=(images, seeds))
    return np.where(rng.random((images, seeds)) < 0.85, dominant, other)


def fill(store, keys, labels, counts, chunk_images: int = 20):
    """Image i gets labels for seeds 0 .. counts[i]-1."""
    for i in range(0, len(keys), chunk_images):
        rows = range(i, min(i + chunk_images, len(keys)))
        ks = [keys[r] for r in rows for _ in range(counts[r])]
        ss = [s for r in rows for s in range(counts[r])]
        if ks:
            store.put(ks, ss, np.concatenate([labels[r, : counts[r]] for r in rows]))


def random_pairs(counts: np.ndarray, batch: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """`batch` random stored (image, seed) pairs."""
    stored = np.flatnonzero(counts)
    ki = stored[rng.integers(0, len(stored), batch)]
    return ki, (rng.random(batch) * counts[ki]).astype(np.int64)


def measure(store, keys, labels, counts, batch: int, seconds: float, rng) -> dict:
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ki, si = random_pairs(counts, batch, rng)
        got = store.get([keys[i] for i in ki], si)
        n += batch
    get_rate = n / (time.perf_counter() - t0)
    assert got.present.all() and (got.top1 == labels[ki, si]).all(), "store returned wrong labels"
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ki, si = random_pairs(counts, batch, rng)
        store.put([keys[i] for i in ki], si, labels[ki, si])  # rewrites: same bytes, idempotent
        n += batch
    return {"get_labels_per_s": round(get_rate), "put_labels_per_s": round(n / (time.perf_counter() - t0))}


class BenchStore(BaseModel):
    redis_url: str = Field("redis://127.0.0.1:6379/15", description="Redis to measure (a scratch db)")
    images: int = Field(2000, ge=1, description="images in the store")
    seeds: int = Field(300, ge=1, description="seeds per image (a 300-epoch run), when no --epochs")
    epochs: int = Field(0, ge=0, description="shape the store like this many epochs of a run's schedule (0: --seeds)")
    repeats: int = Field(3, ge=1, description="the schedule's repeated augmentation (with --epochs)")
    repeat_mode: str = Field("deit", description="the schedule's repeat mode: deit or all (with --epochs)")
    shard_size: int = Field(100, ge=1, description="images per shard of the schedule (with --epochs)")
    batch: int = Field(256, ge=1, description="(key, seed) pairs per get or put")
    seconds: float = Field(3.0, gt=0, description="per measurement")
    backends: str = Field("redis,file", description="comma-separated backends to measure: redis, redis_cluster, file")
    cluster_url: str | None = Field(
        None, description="Redis Cluster to measure (default: a local 3-master cluster of redis-server processes)"
    )


def main():
    args = parse_script_args(BenchStore, __doc__)
    rng = np.random.default_rng(0)
    ns = Namespace(f"bench@{uuid.uuid4().hex[:8]}", "bench", RecordFormat(), num_classes=1000)
    keys = [f"n{i // 1300:08d}/n{i // 1300:08d}_{i:06d}" for i in range(args.images)]  # ImageNet-like keys
    if args.epochs:
        sizes = [args.shard_size] * (args.images // args.shard_size)
        sizes += [args.images % args.shard_size] if args.images % args.shard_size else []
        schedule = RepeatSchedule(tuple(sizes), args.repeats, args.repeat_mode)
        counts = np.array(
            [len(schedule.seeds_for_run(s, i, args.epochs)) for s, n in enumerate(sizes) for i in range(n)]
        )
    else:
        counts = np.full(args.images, args.seeds)
    labels = teacher_like_labels(rng, args.images, int(counts.max()))
    total = int(counts.sum())
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as d, contextlib.ExitStack() as stack:
            servers = []  # redis-py clients of every server holding the rows: memory is their sum
            if backend == "redis":
                url = args.redis_url
                servers = [redis.Redis.from_url(url)]
            elif backend == "redis_cluster":
                url = args.cluster_url or stack.enter_context(LocalRedisCluster(Path(d) / "cluster")).url
                servers = [redis.Redis(host=n.host, port=n.port) for n in redis.RedisCluster.from_url(
                    url.split("?")[0]).get_primaries()]  # fmt: skip
            else:
                url = f"{d}/labels.db"
            before = sum(r.info("memory")["used_memory"] for r in servers)
            store = open_store(url, ns, seed_limit=int(counts.max()))
            t0 = time.perf_counter()
            fill(store, keys, labels, counts)
            fill_rate = total / (time.perf_counter() - t0)
            if servers:
                size = sum(r.info("memory")["used_memory"] for r in servers) - before
            else:
                size = store.bytes_used()
            out = {
                "backend": backend,
                "images": args.images,
                **(
                    {"epochs": args.epochs, "repeats": args.repeats, "repeat_mode": args.repeat_mode}
                    if args.epochs
                    else {"seeds": args.seeds}
                ),
                "labels": total,
                "labels_per_image": round(total / args.images, 1),
                "batch": args.batch,
                "fill_labels_per_s": round(fill_rate),
                **measure(store, keys, labels, counts, args.batch, args.seconds, rng),
                "bytes_per_label": round(size / total, 3),
            }
            store.drop()
            store.close()
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
