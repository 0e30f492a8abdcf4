"""Where a label's CPU goes: CPU seconds per 1,000 labels of each process of precompute and of the
service's miss path, and how busy the machine was; one JSON line.

    python bench/service_cpu.py --input-size 32 --items-per-request 64

The same data, teacher (random weights), policy and workers as `bench/teacher.py`. Precompute runs
twice in one process, over --seeds-small and then --seeds-large new seeds an image; each run's
start-up (its workers' spawn and imports) is the same, so the difference of the two runs' CPU
over the difference of their labels is the CPU of a label alone, split into the precompute process
(teacher, feeder, store writer) and its augmentation workers. The service is started and warmed
first; then --clients threads of this process send --requests miss requests of
--items-per-request (key, seed) pairs in training order (one seed an image, as a trainer asks), and
the CPU each process of the service spent meanwhile is read from /proc (psutil): the HTTP worker
(`serve`'s process), the label engine, its augmentation workers, and the clients. On a machine
whose cores are all busy, labels/s is cores / (CPU s a label): this is where a gap in
`service_vs_precompute` is.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from pydantic import BaseModel, Field
from teacher import miss_request, miss_service

from distill_core import parse_script_args, usable_cpus
from labels.client import TeacherClient

from common import bench_shards

PRECOMPUTE = """
import json, resource, sys
from labels.teacher import Teacher, TeacherSettings
from teacher_service.precompute import PrecomputeConfig, precompute
shards, store, policy = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
workers, batch = int(sys.argv[4]), int(sys.argv[5])
teacher = Teacher(TeacherSettings(model=sys.argv[6], random_init=True, num_classes=10))
def cpu():
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime  # workers count once reaped
for seeds in sys.argv[7:]:
    before = cpu()
    job = PrecomputeConfig(shards=shards, store=store, seeds=seeds, policy=policy, workers=workers, batch_size=batch,
                           progress=False)
    out = precompute(job, teachers=[teacher])
    after = cpu()
    print(json.dumps({"seeds": seeds, "labels": out["labels_computed"], "process_s": after[0] - before[0],
                      "workers_s": after[1] - before[1], "steady_labels_per_s": out["steady_labels_per_s"]}))
"""


class ServiceCpu(BaseModel):
    model: str = Field("regnety_002", description="timm teacher model (random weights)")
    input_size: int = Field(64, ge=8, description="crop size")
    batch_size: int = Field(64, ge=1, description="teacher batch size (precompute and the service)")
    workers: int = Field(max(1, min(8, usable_cpus() - 1)), ge=1, description="augmentation workers of both")
    seeds_small: int = Field(1, ge=1, description="seeds an image of precompute's first run")
    seeds_large: int = Field(5, ge=2, description="seeds an image of its second run")
    clients: int = Field(16, ge=1, description="concurrent clients of the service")
    items_per_request: int = Field(16, ge=1, description="(key, seed) pairs a request")
    requests: int = Field(300, ge=10, description="miss requests sent in all")


def per_1k(seconds: float, labels: int) -> float:
    return round(seconds / labels * 1000, 4)


def precompute_cpu(args: ServiceCpu, shards: Path, d: Path) -> dict:
    small, large = args.seeds_small, args.seeds_small + args.seeds_large
    argv = [sys.executable, "-c", PRECOMPUTE, str(shards), str(d / "pre.db"), json.dumps(policy(args)),
            str(args.workers), str(args.batch_size), args.model, f"0:{small}", f"{small}:{large}"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    a, b = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    labels = b["labels"] - a["labels"]
    return {
        "process": per_1k(b["process_s"] - a["process_s"], labels),
        "workers": per_1k(b["workers_s"] - a["workers_s"], labels),
        "steady_labels_per_s": b["steady_labels_per_s"],
    }


def service_cpu(args: ServiceCpu, shards: Path, d: Path, keys: list[str]) -> dict:
    service = miss_service(args.model, shards, str(d / "svc.db"), args.batch_size, policy(args), args.workers)
    try:
        clients = [TeacherClient(service.url, timeout=120) for _ in range(args.clients)]
        clients[0].label(keys[: args.items_per_request], [0] * args.items_per_request)  # warm
        order, items = itertools.count(), args.items_per_request

        def send(c: TeacherClient) -> None:
            while (k := next(order)) < args.requests:
                c.label(*miss_request(keys, k, items, 1))

        tree = psutil.Process(service.proc.pid)
        procs = [tree, *tree.children(recursive=True)]
        me = psutil.Process()
        before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
        mine, idle, t0 = sum(me.cpu_times()[:2]), psutil.cpu_times().idle, time.perf_counter()
        threads = [threading.Thread(target=send, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        labels = args.requests * items
        idle_share = (psutil.cpu_times().idle - idle) / wall / psutil.cpu_count()
        spent = {p.pid: sum(p.cpu_times()[:2]) - before[p.pid] for p in procs}
        roles = {"http_worker": spent[tree.pid], "engine": 0.0, "workers": 0.0}
        for p in procs[1:]:
            cmd = " ".join(p.cmdline())
            if "resource_tracker" in cmd:
                continue
            # the engine is serve's child; its augmentation workers are the engine's children
            roles["engine" if p.ppid() == tree.pid else "workers"] += spent[p.pid]
        roles["clients"] = sum(me.cpu_times()[:2]) - mine
        out = {k: per_1k(v, labels) for k, v in roles.items()}
        out |= {"labels_per_s": round(labels / wall, 1), "idle_share": round(idle_share, 3)}
        return out
    finally:
        service.stop(30)


def policy(args: ServiceCpu) -> dict:
    return {"input_size": args.input_size, "renderer": "pil"}


def main() -> None:
    args = parse_script_args(ServiceCpu, __doc__)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        _, samples = bench_shards("digits", d / "shards", 2048, existing=None)
        pre = precompute_cpu(args, d / "shards", d)
        svc = service_cpu(args, d / "shards", d, [r.key for r in samples])
    pre["total"] = round(pre["process"] + pre["workers"], 4)
    svc["total"] = round(sum(svc[k] for k in ("http_worker", "engine", "workers", "clients")), 4)
    print(json.dumps({
        "cpu_s_per_1k_labels": {"precompute": pre, "service": svc},
        "cpus": usable_cpus(), "workers": args.workers, "input_size": args.input_size,
        "items_per_request": args.items_per_request, "clients": args.clients,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
