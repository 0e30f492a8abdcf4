"""A bounded load test of the teacher service on loopback; prints one JSON line.

python bench/load.py                                    # two 20 s phases, CPU-sized
python bench/load.py --seconds 60 --clients 16          # longer

A real `serve` (demo shards, a random regnety_002 teacher, the file store) gets requests that mix
cache hits (labels precomputed for seed 0) and misses (new seeds) from concurrent clients:

- `below`: what the clients keep in flight fits the engine's queue (--max-queue-size): every
  request must succeed;
- `above`: each client sends more misses at once than the queue holds with the others': the
  service must refuse the excess with 503 + Retry-After, and nothing else.

Reported per phase: requests, status counts, p50/p99 latency, labels/s; and the service's resident
memory (all its processes) after a warm-up and at the end of each phase.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from distill_core import parse_script_args

from common import demo_shards


class BenchLoad(BaseModel):
    seconds: float = Field(20.0, gt=0, description="length of each phase")
    clients: int = Field(8, ge=1, description="concurrent clients")
    hits: int = Field(24, ge=0, description="cached (key, seed) items per request")
    misses: int = Field(8, ge=1, description="new (key, seed) items per request, below the queue")
    misses_above: int = Field(96, ge=1, description="new items per request in the `above` phase")
    queue_size: int = Field(256, ge=1, description="the engine's --max-queue-size")
    max_batch_size: int = Field(32, ge=1, description="the engine's --max-batch-size")
    augment_workers: int = Field(1, ge=1, description="the engine's augmentation processes")


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (MB)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,rss="], capture_output=True, text=True).stdout.split()
    rows = [(int(a), int(b), int(c)) for a, b, c in zip(out[::3], out[1::3], out[2::3])]
    children: dict[int, list[int]] = {}
    rss = {}
    for p, pp, r in rows:
        children.setdefault(pp, []).append(p)
        rss[p] = r
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return round(total / 1024, 1)


def phase(url: str, keys: list[str], args: BenchLoad, misses: int, fresh: itertools.count) -> dict:
    import httpx

    stop = time.time() + args.seconds
    lock = threading.Lock()
    statuses: Counter = Counter()
    latencies: list[float] = []
    retry_after_missing = 0
    labels = 0

    def client(i: int) -> None:
        nonlocal retry_after_missing, labels
        rng = np.random.default_rng(i)
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.time() < stop:
                with lock:  # (key, seed) pairs no one asked for yet, in training order: all new
                    pairs = [next(fresh) for _ in range(misses)]
                hit_keys = [keys[j] for j in rng.integers(0, len(keys), args.hits)]
                body = {
                    "keys": hit_keys + [keys[p % len(keys)] for p in pairs],
                    "seeds": [0] * args.hits + [1 + p // len(keys) for p in pairs],
                }
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/labels", json=body)
                    code = r.status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                dt = time.perf_counter() - t0
                with lock:
                    statuses[code] += 1
                    if code == 200:
                        latencies.append(dt)
                        labels += args.hits + misses
                    elif code == 503 and "retry-after" not in r.headers:
                        retry_after_missing += 1
                if code == 503:
                    time.sleep(min(float(r.headers.get("retry-after", 1)), 1.0))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t0
    pct = (lambda q: round(1000 * float(np.percentile(latencies, q)), 1)) if latencies else (lambda q: None)
    return {
        "requests": sum(statuses.values()),
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
        "failures": sum(v for k, v in statuses.items() if k != 200),
        "non_503_failures": sum(v for k, v in statuses.items() if k not in (200, 503)),
        "503_without_retry_after": retry_after_missing,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "labels_per_s": round(labels / elapsed, 1),
    }


def main():
    args = parse_script_args(BenchLoad, __doc__)
    from labels.teacher import TeacherSettings
    from teacher_service import TeacherClient
    from teacher_service.local import LocalService, serve_argv

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        _, samples = demo_shards(d / "shards")
        keys = [r.key for r in samples]
        argv = serve_argv(
            teacher=TeacherSettings(model="regnety_002", random_init=True, num_classes=10), shards=str(d / "shards"),
            store=str(d / "labels.db"), max_queue_size=args.queue_size, max_batch_size=args.max_batch_size,
            augment_workers=args.augment_workers, log_level="warning",
        )  # fmt: skip
        service = LocalService(argv, d / "service.log").start(timeout=300)
        proc, url = service.proc, service.url
        try:
            client = TeacherClient(url, timeout=300)
            for i in range(0, len(keys), 256):  # the hits: seed 0 of every image, computed once
                client.label(keys[i : i + 256], [0] * len(keys[i : i + 256]))
            fresh = itertools.count()  # pair p: key p % images, seed 1 + p // images
            rss = {"warm_mb": tree_rss_mb(proc.pid)}
            below = phase(url, keys, args, args.misses, fresh)
            rss["after_below_mb"] = tree_rss_mb(proc.pid)
            above = phase(url, keys, args, args.misses_above, fresh)
            rss["after_above_mb"] = tree_rss_mb(proc.pid)
        finally:
            service.stop(60)
    print(
        json.dumps(
            {
                "clients": args.clients,
                "seconds": args.seconds,
                "queue_size": args.queue_size,
                "below": {"items_in_flight": args.clients * args.misses, **below},
                "above": {"items_in_flight": args.clients * args.misses_above, **above},
                "rss": rss,
                "rss_growth": round(rss["after_above_mb"] / rss["warm_mb"] - 1, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
