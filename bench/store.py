"""Label store throughput and size; prints one JSON line per backend.

python bench/store.py [--redis-url redis://127.0.0.1:6379/15] [--images 2000] [--seeds 300]

The store is shaped like a 300-epoch run: every image has a label for every seed. Labels follow
what a teacher produces: per image one dominant class (85% of crops), the rest spread over 1000
classes. Gets and puts are batches of 256 random (key, seed) pairs from one client on loopback.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid

import numpy as np
import redis

from teacher_service.namespace import Namespace, RecordFormat
from teacher_service.store import open_store


def teacher_like_labels(rng, images: int, seeds: int, classes: int = 1000) -> np.ndarray:
    dominant = rng.integers(0, classes, size=(images, 1))
    other = rng.integers(0, classes, size=(images, seeds))
    return np.where(rng.random((images, seeds)) < 0.85, dominant, other)


def fill(store, keys, labels, chunk_images: int = 20):
    seeds = labels.shape[1]
    for i in range(0, len(keys), chunk_images):
        ks = [k for k in keys[i : i + chunk_images] for _ in range(seeds)]
        ss = [s for _ in keys[i : i + chunk_images] for s in range(seeds)]
        store.put(ks, ss, labels[i : i + chunk_images].reshape(-1))


def measure(store, keys, labels, batch: int, seconds: float, rng) -> dict:
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ki = rng.integers(0, len(keys), batch)
        si = rng.integers(0, labels.shape[1], batch)
        got = store.get([keys[i] for i in ki], si)
        n += batch
    get_rate = n / (time.perf_counter() - t0)
    assert got.present.all() and (got.top1 == labels[ki, si]).all(), "store returned wrong labels"
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ki = rng.integers(0, len(keys), batch)
        si = rng.integers(0, labels.shape[1], batch)
        store.put([keys[i] for i in ki], si, labels[ki, si])  # rewrites: same bytes, idempotent
        n += batch
    return {"get_labels_per_s": round(get_rate), "put_labels_per_s": round(n / (time.perf_counter() - t0))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--backends", default="redis,file")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ns = Namespace(f"bench@{uuid.uuid4().hex[:8]}", "bench", RecordFormat(), num_classes=1000)
    keys = [f"n{i // 1300:08d}/n{i // 1300:08d}_{i:06d}" for i in range(args.images)]  # ImageNet-like keys
    labels = teacher_like_labels(rng, args.images, args.seeds)
    total = labels.size
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as d:
            if backend == "redis":
                url = args.redis_url
                r = redis.Redis.from_url(url)
                before = r.info("memory")["used_memory"]
            else:
                url = f"{d}/labels.db"
            store = open_store(url, ns)
            t0 = time.perf_counter()
            fill(store, keys, labels)
            fill_rate = total / (time.perf_counter() - t0)
            if backend == "redis":
                size = r.info("memory")["used_memory"] - before
            else:
                size = store.bytes_used()
            out = {
                "backend": backend,
                "images": args.images,
                "seeds": args.seeds,
                "batch": args.batch,
                "fill_labels_per_s": round(fill_rate),
                **measure(store, keys, labels, args.batch, args.seconds, rng),
                "bytes_per_label": round(size / total, 3),
            }
            if backend == "redis":
                for chunk in range(0, len(keys), 500):
                    r.delete(*[store.prefix + k for k in keys[chunk : chunk + 500]])
                r.delete(store.meta_key)
            store.close()
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
