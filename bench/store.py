"""Label store throughput and size; prints one JSON line per backend.

python bench/store.py [--redis-url redis://127.0.0.1:6379/15] [--images 2000] [--seeds 300]
python bench/store.py --backends redis,redis_cluster      # one Redis vs a local 3-master cluster
python bench/store.py --epochs 300 --repeats 3            # the pairs DeiT's 300-epoch schedule asks for
python bench/store.py --backends slot_read                # whole-row MGET against server-side slot reads

The store is shaped like a 300-epoch run: every image has a label for every seed (`--seeds`), or,
with `--epochs`, exactly the seeds that run's schedule asks each image for (`shards/schedule.py`:
about E/R selections of R seeds each, on shards of `--shard-size` images). Labels follow
what a teacher produces: per image one dominant class (85% of crops), the rest spread over 1000
classes. Gets and puts are batches of 256 random (key, seed) pairs from one client on loopback.

`slot_read` compares, on one Redis with rows of 300 and 900 seeds, three ways to read a
training-order batch (256 distinct keys at one seed): the store's whole-row MGET (slots cut out by
the client), a Lua script that returns only the requested slot of each row (one round trip), and
a pipeline of GETRANGE commands. Per way: labels/s from one client, the server's microseconds per
label (INFO commandstats: what bounds one Redis across many clients) and bytes on the wire per label.
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
from labels.namespace import Namespace, RecordFormat
from labels.store import open_store
from shards import RepeatSchedule

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


# the requested slot of each row, server-side: KEYS are the rows, ARGV[1] the slot width, then offsets
SLOT_READ = """
local w = tonumber(ARGV[1])
local out = {}
for i, k in ipairs(KEYS) do
  local off = tonumber(ARGV[i + 1])
  out[i] = redis.call('GETRANGE', k, off, off + w - 1)
end
return table.concat(out)
"""


def slot_read(url: str, images: int, seeds_list: list[int], seconds: float, rng) -> list[dict]:
    """Whole-row MGET (the store's get) against server-side slot reads, training-order batches."""
    server = redis.Redis.from_url(url)
    script = server.script_load(SLOT_READ)
    return [_compare_reads(server, script, url, images, seeds, seconds, rng) for seeds in seeds_list]


def _compare_reads(server, script: str, url: str, images: int, seeds: int, seconds: float, rng) -> dict:
    ns = Namespace(f"bench@{uuid.uuid4().hex[:8]}", "bench", RecordFormat(), num_classes=1000)
    store = open_store(url, ns, seed_limit=seeds)
    keys = [f"n{i // 1300:08d}/n{i // 1300:08d}_{i:06d}" for i in range(images)]
    labels = teacher_like_labels(rng, images, seeds)
    fill(store, keys, labels, np.full(images, seeds))
    names = [store.prefix + k for k in keys]
    width = store.codec.width

    def slots(raw: bytes) -> np.ndarray:
        return store.codec.decode(np.frombuffer(raw, np.uint8).reshape(-1, width)).top1

    def mget(idx, seed):
        return store.get([keys[i] for i in idx], [seed] * len(idx)).top1

    def lua(idx, seed):
        return slots(server.evalsha(script, len(idx), *[names[i] for i in idx], width, *([seed * width] * len(idx))))

    def getrange(idx, seed):
        pipe = server.pipeline(transaction=False)
        for i in idx:
            pipe.getrange(names[i], seed * width, seed * width + width - 1)
        return slots(b"".join(pipe.execute()))

    row = {"seeds": seeds, "images": images}
    for name, fn, command in (("mget", mget, "mget"), ("lua", lua, "evalsha"), ("getrange", getrange, "getrange")):
        order = rng.permutation(images)
        server.config_resetstat()
        n, b, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            idx = order[(b * 256) % images :][:256]
            seed = int(rng.integers(seeds))
            assert (fn(idx, seed) == labels[idx, seed]).all(), name
            n, b = n + len(idx), b + 1
        rate = n / (time.perf_counter() - t0)
        stats = server.info("commandstats")[f"cmdstat_{command}"]
        row[name] = {
            "labels_per_s": round(rate),
            "server_us_per_label": round(stats["usec"] / n, 3),
            "wire_bytes_per_label": width * seeds if name == "mget" else width,
        }
    store.drop()
    store.close()
    return row


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
    backends: str = Field(
        "redis,file", description="comma-separated: redis, redis_cluster, file, slot_read (see above)"
    )
    slot_read_seeds: str = Field("300,900", description="row lengths (seeds) of the slot_read comparison")
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
        if backend == "slot_read":
            seeds_list = [int(x) for x in args.slot_read_seeds.split(",")]
            for row in slot_read(args.redis_url, args.images, seeds_list, args.seconds, rng):
                print(json.dumps({"backend": backend, **row}), flush=True)
            continue
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
