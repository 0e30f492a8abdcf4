"""ImageNet-shaped costs per image, at two data-set sizes, so that slopes are measured; one JSON line.

python bench/scale.py [--sizes 5000,20000] [--classes 100] [--shard-size 1000]

For each size it makes an image folder of ImageNet-shaped JPEGs (500x375 or 375x500, quality 95,
cut from scikit-learn's two photographs by random crops, rescales, flips and colour shifts:
`common.imagenet_like_jpegs`) and measures:

- `build`: `python -m shards build --src` images/s (one process: per core), member index included;
- `index`: opening the split's member index as `serve`, precompute and the stream do (checksum
  included); the index's bytes per image; what binding labels to their bytes costs: the start-up
  comparison of the manifest with the labels' shard digests, and the digest of each image read;
- `serve`: seconds from starting `python -m teacher_service serve --http-workers 2` (regnety_002,
  random weights) to `/readyz` answering 200, and the resident
  (RSS) and proportional (PSS) memory of the supervisor, each HTTP worker and the engine's processes;
- `loader`: the trainer's data side at 224 px (DeiT's policy, `deit` schedule, 3 repeats): seconds
  from creating the stream to its first batch, then images/s per core (`--loader-batches` batches);
- `store`: a Redis (`--redis-url`, a scratch db) filled with every image's labels at 300 and 900
  seeds: bytes per label (used_memory), and `get` labels/s in training order (256 keys of a
  batch at one seed, one client on loopback).

Once (the rates do not depend on the data set's size): `precompute` labels/s per core at 224 px
with regnety_002 on one shard, and its cost split per image into decode / augment / teacher,
each timed on one thread. `plan` extrapolates to ImageNet-1k (1,281,167 images) from these slopes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import redis
import torch
from pydantic import BaseModel, Field

from distill_core import parse_script_args, to_argv, usable_cpus
from labels.namespace import Namespace, RecordFormat
from labels.provenance import check_labelled_bytes
from labels.store import open_store
from labels.teacher import Teacher, TeacherSettings
from shards import Manifest, ShardStream, StreamOptions, augment, decode_image, make_loader
from shards.build import BuildConfig
from shards.index import SplitIndex
from shards.members import Member, OpenFiles
from teacher_service.local import LocalService, serve_argv
from teacher_service.precompute import PrecomputeConfig, precompute

from common import imagenet_like_jpegs

IMAGENET = 1_281_167


class BenchScale(BaseModel):
    sizes: str = Field("5000,20000", description="comma-separated data-set sizes (images)")
    classes: int = Field(100, ge=2, description="class folders")
    shard_size: int = Field(1000, ge=1, description="images per shard")
    quality: int = Field(95, ge=1, le=100, description="JPEG quality of the generated images")
    model: str = Field("regnety_002", description="timm teacher (random weights) for serve and precompute")
    precompute_images: int = Field(1000, ge=64, description="images precompute labels (one seed each)")
    loader_batches: int = Field(12, ge=2, description="batches of 64 the loader measurement reads")
    redis_url: str = Field("redis://127.0.0.1:6379/15", description="Redis for the store figures (a scratch db)")
    seconds: float = Field(3.0, gt=0, description="per store get measurement")
    workdir: Path | None = Field(None, description="where to build (default: a temporary directory)")


def _jpeg_chunk(job: tuple[Path, int, int, int, int, int]) -> int:
    src, start, n, classes, quality, seed = job
    for i, data in enumerate(imagenet_like_jpegs(n, seed=seed, quality=quality)):
        k = start + i
        folder = src / f"n{k % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"n{k % classes:08d}_{k:07d}.JPEG").write_bytes(data)
    return n


def make_folder(src: Path, n: int, classes: int, quality: int) -> float:
    """An ImageNet-layout folder of `n` JPEGs; returns seconds."""
    t0 = time.perf_counter()
    chunk = 250
    jobs = [(src, s, min(chunk, n - s), classes, quality, s // chunk) for s in range(0, n, chunk)]
    with ProcessPoolExecutor(usable_cpus()) as pool:
        assert sum(pool.map(_jpeg_chunk, jobs)) == n
    return time.perf_counter() - t0


def build(src: Path, out: Path, shard_size: int) -> dict:
    argv = to_argv(BuildConfig(src=src, out=out, shard_size=shard_size))
    r = subprocess.run([sys.executable, "-m", "shards", "build", *argv], capture_output=True, text=True, check=True)
    s = json.loads(r.stdout.strip().splitlines()[-1])
    return {"seconds": s["seconds"], "images_per_s_per_core": s["images_per_s"]}


def index_open(out: Path) -> dict:
    def best(fn, times: int = 3) -> float:
        runs = []
        for _ in range(times):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        return min(runs)

    manifest = Manifest.load(out)
    index = SplitIndex.open(out, "train", manifest)
    records = [{"seeds": 300, "shards": manifest.shard_digests("train")}]  # what precompute records
    members = [index.member(r) for r in range(len(index))]
    files = OpenFiles()
    read_s = best(lambda: [Member(m.path, m.offset, m.size).read(files) for m in members], times=2)
    checked_s = best(lambda: [m.read(files) for m in members], times=2)
    files.close()
    return {
        "open_s": round(best(lambda: SplitIndex.open(out, "train", Manifest.load(out))), 5),
        "bytes_per_image": round(index.nbytes / len(index), 1),
        # labels bound to their bytes: the start-up comparison with the labels' shard digests, and
        # the digest of every image as it is read (per image, over reading it without one)
        "labelled_bytes_check_s": round(best(lambda: check_labelled_bytes(records, manifest, "train", "bench")), 6),
        "read_us_per_image": round(1e6 * read_s / len(members), 2),
        "digest_us_per_image": round(1e6 * (checked_s - read_s) / len(members), 2),
    }


def _proc_memory_mb(pid: int) -> dict:
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().split("\n")
    fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:] if line.strip()}
    return {"rss_mb": round(fields["Rss"] / 1024, 1), "pss_mb": round(fields["Pss"] / 1024, 1)}


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(p) for p in text]
    return out


def _listens(pid: int, inode: str) -> bool:
    try:
        return any(os.readlink(f) == f"socket:[{inode}]" for f in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def serve(shards: Path, model: str, workdir: Path) -> dict:
    """Seconds to /readyz and the memory of each of serve's processes."""
    argv = serve_argv(
        teacher=TeacherSettings(model=model, random_init=True, num_classes=100), shards=str(shards),
        store=str(workdir / f"serve-{shards.name}.db"), http_workers=2, log_level="warning",
    )  # fmt: skip
    service = LocalService(argv, workdir / f"serve-{shards.name}.log").start(timeout=600)
    proc, port = service.proc, service.port
    try:
        ready = service.ready_s
        time.sleep(1.0)  # every HTTP worker answered start-up
        listening = next(
            line.split()[9]
            for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
            if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
        )
        http, engines = [], []
        for child in _children(proc.pid):
            (http if _listens(child, listening) else engines).append(child)
        engine_tree = engines + [g for e in engines for g in _children(e)]
        return {
            "ready_s": round(ready, 2),
            "supervisor": _proc_memory_mb(proc.pid),
            "http_workers": [_proc_memory_mb(p) for p in http],
            "engine_processes_pss_mb": round(sum(_proc_memory_mb(p)["pss_mb"] for p in engine_tree), 1),
        }
    finally:
        service.stop(60)


def loader(shards: Path, batches: int) -> dict:
    """The trainer's data side: stream + loader to the first batch, then images/s per core."""
    workers = usable_cpus()
    t0 = time.perf_counter()
    m = Manifest.load(shards)
    stream = ShardStream(
        shards, "train", m.policy(), options=StreamOptions(repeats=3, repeat_mode="deit"), batch_size=64
    )
    it = iter(make_loader(stream, num_workers=workers))
    next(it)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(batches - 1):
        next(it)
    rate = 64 * (batches - 1) / (time.perf_counter() - t1)
    del it
    return {"first_batch_s": round(first, 2), "images_per_s_per_core": round(rate / workers, 1)}


def store_figures(keys: list[str], seeds: int, url: str, seconds: float) -> dict:
    """Every image's labels at seeds 0..seeds-1 in a fresh namespace: bytes per label and
    training-order gets (a batch's keys at one seed)."""
    rng = np.random.default_rng(0)
    ns = Namespace(f"scale@{uuid.uuid4().hex[:8]}", "bench", RecordFormat(), num_classes=1000)
    server = redis.Redis.from_url(url)
    before = server.info("memory")["used_memory"]
    store = open_store(url, ns, seed_limit=seeds)
    try:
        labels = rng.integers(0, 1000, size=(len(keys), seeds))
        t0 = time.perf_counter()
        chunk = max(1, 20_000 // seeds)
        for i in range(0, len(keys), chunk):
            ks = keys[i : i + chunk]
            store.put(
                [k for k in ks for _ in range(seeds)], [s for _ in ks for s in range(seeds)], labels[i : i + chunk]
            )
        fill = len(keys) * seeds / (time.perf_counter() - t0)
        used = server.info("memory")["used_memory"] - before
        order = rng.permutation(len(keys))
        n, t0, b = 0, time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            idx = order[(b * 256) % len(keys) :][:256]
            seed = int(rng.integers(seeds))
            got = store.get([keys[i] for i in idx], [seed] * len(idx))
            assert got.present.all() and (got.top1 == labels[idx, seed]).all()
            n, b = n + len(idx), b + 1
        return {
            "bytes_per_label": round(used / (len(keys) * seeds), 3),
            "fill_labels_per_s": round(fill),
            "get_training_order_labels_per_s": round(n / (time.perf_counter() - t0)),
        }
    finally:
        store.drop()
        store.close()


def cost_split(shards: Path, model: str, n: int = 64) -> dict:
    """Per image on one thread: JPEG decode, DeiT's 224 px augmentation, the teacher's forward."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = Manifest.load(shards)
        index = SplitIndex.open(shards, "train", m)
        policy = m.policy()
        data = [index.member(r).read() for r in range(n)]
        t0 = time.perf_counter()
        images = [decode_image(d) for d in data]
        decode = (time.perf_counter() - t0) / n
        augment(images[0], "warm", 0, policy)
        t0 = time.perf_counter()
        crops = [augment(im, f"k{i}", 0, policy) for i, im in enumerate(images)]
        aug = (time.perf_counter() - t0) / n
        teacher = Teacher(TeacherSettings(model=model, random_init=True, num_classes=100), device="cpu")
        x = torch.stack(crops[:32])
        teacher.predict(x)
        t0 = time.perf_counter()
        for _ in range(2):
            teacher.predict(x)
        infer = (time.perf_counter() - t0) / 64
        total = decode + aug + infer
        return {
            "decode_ms": round(1000 * decode, 2),
            "augment_ms": round(1000 * aug, 2),
            "teacher_ms": round(1000 * infer, 2),
            "labels_per_s_per_core": round(1 / total, 1),
        }
    finally:
        torch.set_num_threads(threads)


def precompute_rate(shards: Path, model: str, images: int, workdir: Path) -> dict:
    m = Manifest.load(shards)
    num = len(m.shards("train"))
    teacher = Teacher(TeacherSettings(model=model, random_init=True, num_classes=100), device="cpu")
    cfg = PrecomputeConfig(
        shards=str(shards), seeds="0:1", store=str(workdir / "pre.db"), batch_size=64, workers=usable_cpus(),
        node_rank=0, num_nodes=max(1, num * m.shards("train")[0].samples // images), progress=False,
    )  # fmt: skip
    s = precompute(cfg, teachers=[teacher])
    assert s["ok"], s
    cores = usable_cpus()
    return {
        "labels": s["labels_computed"],
        "labels_per_s_per_core": round(s["labels_per_s"] / cores, 1),
        "steady_labels_per_s_per_core": round((s["steady_labels_per_s"] or 0) / cores, 1),
    }


def slope(rows: list[dict], get) -> float:
    """Per-image slope of a figure between the smallest and the largest size."""
    a, b = rows[0], rows[-1]
    return (get(b) - get(a)) / (b["images"] - a["images"])


def plan(rows: list[dict], pre: dict) -> dict:
    """ImageNet-1k at 300 epochs x 3 repeats, extrapolated from the largest size measured and the
    per-image slopes. Start-up extrapolates with the index's slope measured in
    process: serve's own time to ready varies by a second from start to start, more than either
    part grows here. An HTTP worker's resident memory gains at most the index file (mapped pages,
    shared by the machine's processes)."""
    last = rows[-1]
    more = IMAGENET - last["images"]
    labels_deit = 300 * -(-IMAGENET // 3) * 3  # DeiT's schedule: ceil(N / 3) images x 3 repeats an epoch
    labels_all = 900 * IMAGENET
    index_mb = IMAGENET * last["index"]["bytes_per_image"] / 2**20
    return {
        "images": IMAGENET,
        "labels_deit_schedule": labels_deit,
        "labels_all_schedule": labels_all,
        "serve_ready_s_with_index": round(last["serve"]["ready_s"] + more * slope(rows, _index_open), 1),
        "index_open_s": round(_index_open(last) + more * slope(rows, _index_open), 3),
        "index_mb": round(index_mb, 1),
        "http_worker_rss_mb_at_most": round(_worker_rss(last) + index_mb, 1),
        "redis_gb_deit_schedule": round(labels_deit * last["store_300"]["bytes_per_label"] / 2**30, 2),
        "redis_gb_all_schedule": round(labels_all * last["store_900"]["bytes_per_label"] / 2**30, 2),
        "precompute_core_hours_regnety_002": round(labels_deit / pre["steady_labels_per_s_per_core"] / 3600),
    }


def _index_open(r: dict) -> float:
    return r["index"]["open_s"]


def _worker_rss(r: dict) -> float:
    return max(w["rss_mb"] for w in r["serve"]["http_workers"])


def main():
    args = parse_script_args(BenchScale, __doc__)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        d = Path(d)
        for n in sizes:
            src, out = d / f"src{n}", d / f"shards{n}"
            row = {"images": n, "generate_s": round(make_folder(src, n, args.classes, args.quality), 1)}
            row["jpeg_kb_mean"] = round(sum(f.stat().st_size for f in src.rglob("*.JPEG")) / n / 1024, 1)
            row["build"] = build(src, out, args.shard_size)
            shutil.rmtree(src)
            row["index"] = index_open(out)
            row["serve"] = serve(out, args.model, d)
            row["loader"] = loader(out, args.loader_batches)
            keys = list(SplitIndex.open(out, "train", Manifest.load(out)).iter_keys())
            row["store_300"] = store_figures(keys, 300, args.redis_url, args.seconds)
            row["store_900"] = store_figures(keys, 900, args.redis_url, args.seconds)
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
            if n != sizes[-1]:
                shutil.rmtree(out)
        split = cost_split(out, args.model)
        pre = precompute_rate(out, args.model, args.precompute_images, d)
    print(
        json.dumps(
            {
                "device": f"cpu x{usable_cpus()}",
                "model": args.model,
                "sizes": rows,
                "precompute": pre,
                "cost_split": split,
                "slopes_per_1000_images": {
                    "serve_ready_s_with_index": round(1000 * slope(rows, lambda r: r["serve"]["ready_s"]), 4),
                    "index_open_s": round(1000 * slope(rows, _index_open), 6),
                    "loader_first_batch_s": round(1000 * slope(rows, lambda r: r["loader"]["first_batch_s"]), 4),
                    "http_worker_rss_mb": round(1000 * slope(rows, _worker_rss), 3),
                },
                "plan": plan(rows, pre),
            }
        )
    )


if __name__ == "__main__":
    main()
