"""Teacher throughput: raw forward vs precompute vs the REST service (batched and naive); one JSON line.

python bench/teacher.py --model regnety_160 --input-size 224 --batch-size 128      # DeiT's teacher (GPU)
python bench/teacher.py --input-size 32 --items-per-request 64                      # CPU-sized

Random teacher weights (speed only). Images are the demo digits upscaled by the augmentation's
RandomResizedCrop to --input-size. Precompute and the service use the same teacher, policy, batch
size and number of augmentation workers. The service runs as a real `serve` process (label engine
+ uvicorn), started once. Then rounds (`--precompute-runs`): a precompute run over `--seeds` new
seeds an image, then `--seconds` of concurrent clients on loopback sending the service cache misses
(fresh seeds, one an image, in training order) at saturation (`--clients`). Each round gives a
ratio of the two steady rates, measured minutes apart at most, so that a machine whose speed
drifts moves both alike: `service_vs_precompute` is the rounds' median. Then moderate load
(`--latency-clients` sending `--latency-items`-item requests, for the miss latency), 256-label
lookups of cached labels, and the service with batches of one (`--naive`).
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from distill_core import parse_script_args, usable_cpus
from labels.client import TeacherClient
from labels.teacher import Teacher, TeacherSettings
from shards import augment, decode_image
from teacher_service.local import LocalService, serve_argv
from teacher_service.precompute import PrecomputeConfig, precompute

from common import bench_shards


def raw_throughput(teacher: Teacher, x: torch.Tensor, seconds: float) -> float:
    for _ in range(3):
        teacher.predict(x)
    if teacher.device.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        teacher.predict(x)  # returns CPU tensors: includes the device->host copy, like real use
        n += len(x)
    return n / (time.perf_counter() - t0)


def miss_service(model: str, shards: Path, store: str, max_batch: int, policy: dict, workers: int) -> LocalService:
    """A started `serve` of a random-weights teacher over `shards`, batching misses up to `max_batch`."""
    argv = serve_argv(
        teacher=TeacherSettings(model=model, random_init=True, num_classes=10), shards=str(shards), store=store,
        max_batch_size=max_batch, max_queue_delay_ms=5.0, max_queue_size=100000, policy=policy,
        log_level="warning", augment_workers=workers,
    )  # fmt: skip
    return LocalService(argv, Path(f"{store}.service.log")).start(timeout=300)


def miss_request(keys: list[str], k: int, items: int, seed0: int) -> tuple[list[str], list[int]]:
    """The k-th request's (keys, seeds): pairs in training order, key by key, then the next seed
    (seed0, seed0 + 1, ...), so every request asks for new pairs and rows stay as small as a run's."""
    idx = range(k * items, (k + 1) * items)
    return [keys[i % len(keys)] for i in idx], [seed0 + i // len(keys) for i in idx]


def miss_load(url: str, keys: list[str], order, seed0: int, clients: int, items: int, seconds: float):
    """`clients` threads sending `items`-item miss requests for `seconds`: (labels/s, latencies in ms).
    Pairs are taken in training order (`miss_request`; `order` counts the requests of all loads, so
    every request asks for new pairs). The rate is precompute's steady one: the labels answered after
    the first answer, over the time to the last."""
    lat, answered = [], []  # answered: (time, labels) of each answer
    lock = threading.Lock()
    # made before the clock starts, as a trainer makes its one client at start-up (an httpx client
    # builds an SSL context: 16 of them were CPU taken from the service's window)
    made = [TeacherClient(url, timeout=120) for _ in range(clients)]
    stop = time.perf_counter() + seconds

    def client(c: TeacherClient):
        while time.perf_counter() < stop:
            ask = miss_request(keys, next(order), items, seed0)
            t1 = time.perf_counter()
            batch, _ = c.label(*ask)
            t2 = time.perf_counter()
            with lock:
                lat.append((t2 - t1) * 1000)
                answered.append((t2, int(batch.present.sum())))

    threads = [threading.Thread(target=client, args=(c,)) for c in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    answered.sort()
    if len(answered) < 2:  # one answer has no steady rate: its own
        return sum(n for _, n in answered) / (time.perf_counter() - stop + seconds), lat
    return sum(n for _, n in answered[1:]) / (answered[-1][0] - answered[0][0]), lat


def stage_means(client: TeacherClient) -> dict:
    """The service's mean seconds per stage of a miss (and its mean batch), from /metrics."""
    names = ("request_duration_seconds", "queue_duration_seconds", "augment_duration_seconds",
             "compute_infer_duration_seconds", "batch_size")  # fmt: skip
    stages: dict = {}
    for line in client.http.get("/metrics").text.splitlines():
        for name in names:
            for agg in ("sum", "count"):
                if line.startswith(f"distill_{name}_{agg}") and 'endpoint="/v1/labels/lookup"' not in line:
                    stages[f"{name}_{agg}"] = stages.get(f"{name}_{agg}", 0) + float(line.split()[-1])
    return {k: round(stages[f"{k}_sum"] / stages[f"{k}_count"], 4) for k in names if stages.get(f"{k}_count")}


class BenchTeacher(BaseModel):
    model: str = Field("regnety_002", description="timm teacher model (random weights)")
    input_size: int = Field(64, ge=8, description="crop size")
    batch_size: int = Field(64, ge=1, description="teacher batch size (precompute, service, raw forward)")
    seconds: float = Field(10.0, gt=0, description="per throughput measurement")
    seeds: int = Field(4, ge=1, description="seeds per image for each precompute run")
    precompute_runs: int = Field(
        3, ge=1, description="rounds: a precompute run over --seeds new seeds, then --seconds of the service's misses"
    )
    clients: int = Field(16, ge=1, description="concurrent clients at saturation")
    items_per_request: int = Field(16, ge=1, description="items per request at saturation")
    latency_clients: int = Field(4, ge=1, description="clients of the moderate-load latency run")
    latency_items: int = Field(16, ge=1, description="items per request of the latency run")
    lookups: int = Field(200, ge=1, description="lookup requests of 256 cached labels")
    workers: int = Field(
        max(1, min(8, usable_cpus() - 1)),
        ge=1,
        description="augmentation workers of precompute and of the service's engine",
    )
    augment_workers: int = Field(0, ge=0, description="the service's, when not --workers")
    renderer: Literal["pil", "torch"] = Field("pil", description="augmentation renderer")
    data: Literal["digits", "jpeg"] = Field("digits", description="demo digits, or ImageNet-shaped JPEGs")
    images: int = Field(2048, ge=64, description="JPEGs to make for --data jpeg")
    naive: bool = Field(True, description="also measure the service with batches of one")
    shards: str | None = Field(None, description="use these shards instead of making --data (bench/gpu.py's)")


def policy_overrides(args) -> dict:
    return {"input_size": args.input_size, "renderer": args.renderer}


def naive_rate(args, shards: Path, store: str, keys: list[str]) -> float:
    """The service's miss rate with batches of one (no dynamic batching)."""
    service = miss_service(args.model, shards, store, 1, policy_overrides(args), args.augment_workers or args.workers)
    try:
        TeacherClient(service.url, timeout=300).label(keys[:16], [0] * 16)  # warm-up
        return miss_load(service.url, keys, itertools.count(), 1, args.clients, args.items_per_request, args.seconds)[0]
    finally:
        service.stop(30)


def main():
    args = parse_script_args(BenchTeacher, __doc__)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        m, samples = bench_shards(args.data, d / "shards", args.images, existing=args.shards)
        shards = Path(args.shards) if args.shards else d / "shards"
        policy = m.policy(**policy_overrides(args))
        teacher = Teacher(TeacherSettings(model=args.model, random_init=True, num_classes=10))
        raws = samples[:128]
        x = torch.stack([augment(decode_image(r.data), r.key, 0, policy) for r in raws[: args.batch_size]])
        raw = raw_throughput(teacher, x, args.seconds)
        keys = [r.key for r in samples]
        service = miss_service(args.model, shards, str(d / "svc.db"), args.batch_size, policy_overrides(args),
                               args.augment_workers or args.workers)  # fmt: skip
        try:
            warm = TeacherClient(service.url, timeout=300)
            few = keys[:256]  # a batch of cached labels for the lookups
            warm.label(few, [0] * len(few))  # warm-up, and 256 cached labels (seed 0) for the lookups
            order = itertools.count()  # the service's misses: seeds 1, 2, ... in training order
            # Rounds, each a precompute run over --seeds new seeds (the same work per image every
            # time), then as long a window of the service's misses: a machine whose speed drifts
            # over minutes moves both sides of a round alike, and each round gives a ratio.
            pre, svc = [], []
            for i in range(args.precompute_runs):
                pre.append(precompute(
                    PrecomputeConfig(shards=str(shards), seeds=f"{i * args.seeds}:{(i + 1) * args.seeds}",
                                     store=str(d / "pre.db"), policy=policy_overrides(args),
                                     batch_size=args.batch_size, workers=args.workers, progress=False),
                    teachers=[teacher],
                ))  # fmt: skip
                svc.append(
                    miss_load(service.url, keys, order, 1, args.clients, args.items_per_request, args.seconds)[0]
                )
            _, miss_lat = miss_load(service.url, keys, order, 1, args.latency_clients, args.latency_items,
                                    args.seconds / 2)  # fmt: skip
            lookup_lat = []
            for _ in range(args.lookups):  # lookups of cached labels: 256 per request
                t1 = time.perf_counter()
                got = warm.lookup(few, [0] * len(few))
                lookup_lat.append((time.perf_counter() - t1) * 1000)
            assert got.present.all()
            print(f"service: {np.mean(svc):.1f} labels/s, mean per stage: {json.dumps(stage_means(warm))}",
                  file=sys.stderr)  # fmt: skip
        finally:
            service.stop(30)
        del teacher
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        naive = naive_rate(args, shards, str(d / "naive.db"), keys) if args.naive else None
        # steady: between the first and the last answer (a run of one answer has none: its overall rate)
        pre_rates = [p["steady_labels_per_s"] or p["labels_per_s"] for p in pre]
        pre_rate, svc_rate = float(np.mean(pre_rates)), float(np.mean(svc))
        ratios = [s / p for s, p in zip(svc, pre_rates)]
        pct = lambda xs, q: round(float(np.percentile(xs, q)), 2)  # noqa: E731
        out = {
            "model": args.model,
            "input_size": args.input_size,
            "batch_size": args.batch_size,
            "device": "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{usable_cpus()}",
            "workers": args.workers,
            "augment_workers": args.augment_workers or args.workers,
            "raw_images_per_s": round(raw, 1),
            "precompute_labels_per_s": round(pre_rate, 1),
            "precompute_labels_per_s_with_startup": round(float(np.mean([p["labels_per_s"] for p in pre])), 1),
            "precompute_startup_s": pre[0]["startup_s"],  # the first run's, by phase
            "service_labels_per_s": round(svc_rate, 1),
            "renderer": args.renderer,
            "data": args.data,
            "naive_service_labels_per_s": round(naive, 1) if naive else None,
            "service_vs_precompute": round(float(np.median(ratios)), 3),  # the rounds' median
            "service_vs_precompute_rounds": [round(r, 3) for r in ratios],
            "precompute_efficiency": round(pre_rate / raw, 3),
            "service_efficiency": round(svc_rate / raw, 3),
            "naive_service_efficiency": round(naive / raw, 3) if naive else None,
            f"miss{args.latency_items}_p50_ms": pct(miss_lat, 50),
            f"miss{args.latency_items}_p99_ms": pct(miss_lat, 99),
            "lookup_p50_ms": pct(lookup_lat, 50),
            "lookup_p99_ms": pct(lookup_lat, 99),
            "clients": args.clients,
            "items_per_request": args.items_per_request,
            "latency_clients": args.latency_clients,
        }
        print(json.dumps(out))


if __name__ == "__main__":
    main()
