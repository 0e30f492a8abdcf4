"""What the benchmark scripts (and the tests that run them) share: a free loopback port, the demo
shard set with its samples, a local Redis Cluster."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel, Field

from distill_core import free_port  # noqa: F401 (the benchmarks' helper, re-exported)
from shards import Manifest, SkipCounter, iter_shard
from shards.build import BuildConfig, build


class OfficialCodeArgs(BaseModel):
    """The flags of every bench that runs the official DeiT code beside ours on one teacher file."""

    shards: str = Field(description="shard directory with train and val splits")
    teacher: str = Field(description="teacher weights (.safetensors) both codes label with")
    teacher_model: str = Field("regnety_002", description="the teacher's timm architecture")
    official_code: str = Field(description="checkout of DeiT 7e160fe with the CPU patch")
    official_libs: str = Field(description="folder holding timm 0.4.12 and Pillow 9.5 (pip install --target)")


def imagenet_like_jpegs(n: int, seed: int = 0, size=(500, 375), quality: int = 95, processes: int = 1) -> list[bytes]:
    """`n` ImageNet-shaped JPEGs (500x375 or 375x500, JPEG quality 95) cut from the two
    photographs scikit-learn ships by random crops, rescales, flips and colour shifts, so that
    decoding and resizing cost what real photographs cost (noise or flat images would not).
    Image i depends on (seed, i) only, so `processes` > 1 makes the same images faster."""
    if processes > 1 and n > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            chunks = pool.starmap(_jpegs, [(range(i, n, processes), seed, size, quality) for i in range(processes)])
        out = [b""] * n
        for i, chunk in enumerate(chunks):
            out[i::processes] = chunk
        return out
    return _jpegs(range(n), seed, size, quality)


def _jpegs(indices, seed: int, size, quality: int) -> list[bytes]:
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    out = []
    for i in indices:
        rng = random.Random(f"{seed}:{i}")
        photo = photos[rng.randrange(len(photos))]
        w, h = size if rng.random() < 0.75 else size[::-1]  # most of ImageNet is landscape
        scale = rng.uniform(0.5, 1.0)
        cw, ch = int(photo.width * scale), int(photo.height * scale)
        left, top = rng.randrange(photo.width - cw + 1), rng.randrange(photo.height - ch + 1)
        im = photo.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        gains = np.array([rng.uniform(0.8, 1.2) for _ in range(3)], dtype=np.float32)
        im = Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) * gains, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def jpeg_shards(
    directory: Path, n: int, classes: int = 10, shard_size: int = 256, processes: int = 1
) -> tuple[Manifest, list]:
    """Shards of `n` ImageNet-shaped JPEGs (`imagenet_like_jpegs`) in `classes` class folders."""
    src = Path(directory).with_name(Path(directory).name + "-src")
    for i, data in enumerate(imagenet_like_jpegs(n, processes=processes)):
        folder = src / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:07d}.jpg").write_bytes(data)
    build(BuildConfig(out=directory, src=src, shard_size=shard_size))
    m = Manifest.load(directory)
    return m, [r for s in m.shards("train") for r in iter_shard(Path(directory) / s.name, SkipCounter())]


def bench_shards(data: str, directory: Path, n: int = 2048, existing: str | None = None) -> tuple[Manifest, list]:
    """The benchmarks' data: `digits` (the demo, 32 px PNGs) or `jpeg` (`n` ImageNet-shaped JPEGs),
    made in `directory`; or the shards already in `existing` (bench/gpu.py makes them once for
    all its parts)."""
    if existing:
        m = Manifest.load(existing)
        return m, [r for s in m.shards("train") for r in iter_shard(Path(existing) / s.name, SkipCounter())]
    return demo_shards(directory, shard_size=64) if data == "digits" else jpeg_shards(directory, n)


def demo_shards(directory: Path, shard_size: int = 128) -> tuple[Manifest, list]:
    """Build the demo digits into `directory`: its manifest and its train samples, in shard order."""
    build(BuildConfig(out=directory, demo="digits", shard_size=shard_size))
    m = Manifest.load(directory)
    return m, [r for s in m.shards("train") for r in iter_shard(Path(directory) / s.name, SkipCounter())]


def imagefolder_of_shards(shards: str | Path, split: str, out: str | Path) -> Path:
    """OUT/<class>/... of a split's stored image bytes, unchanged: what torchvision's ImageFolder (and
    so the official DeiT code) reads. Class folders are the class indices, zero-padded, so that
    ImageFolder's sorted classes are the shards'. Returns OUT."""
    import io

    from PIL import Image

    m, out = Manifest.load(shards), Path(out)
    for shard in m.shards(split):
        for s in iter_shard(Path(shards) / shard.name, SkipCounter()):
            with Image.open(io.BytesIO(s.data)) as im:
                ext = {"JPEG": "jpg"}.get(im.format, im.format.lower())
            folder = out / f"{s.label:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{s.key.replace('/', '_')}.{ext}").write_bytes(s.data)
    return out


class LocalRedisCluster:
    """A Redis Cluster of `masters` real redis-server processes on free loopback ports (no
    persistence), joined with `redis-cli --cluster create`; for benchmarks and tests."""

    def __init__(self, workdir: Path, masters: int = 3):
        self.nodes = []
        for i in range(masters):
            d = Path(workdir) / f"node{i}"
            d.mkdir(parents=True)
            self.nodes.append((_cluster_port(), d))
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0][0]}/0?cluster=1"

    def start(self) -> LocalRedisCluster:
        for port, d in self.nodes:
            self.procs[port] = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", str(d / "nodes.conf"), "--save", "", "--appendonly", "no", "--dir", str(d)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        for port, _ in self.nodes:
            _wait(f"redis cluster node {port} answers PING", lambda p=port: _cli("-p", str(p), "ping") == "PONG")
        addresses = [f"127.0.0.1:{p}" for p, _ in self.nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        _wait(
            "redis cluster state ok", lambda: "cluster_state:ok" in _cli("-p", str(self.nodes[0][0]), "cluster", "info")
        )
        return self

    def kill(self, port: int | None = None) -> None:
        for p in [port] if port else list(self.procs):
            self.procs.pop(p).kill()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too: Redis refuses ports over 55535."""
    for _ in range(200):
        port = random.randint(20000, 55000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _cli(*args: str) -> str:
    return subprocess.run(["redis-cli", *args], capture_output=True, text=True).stdout.strip()


def _wait(step: str, ready, timeout: float = 60.0) -> None:
    """Until `ready()`; about a second here on 2 cores, so 60 s is for much slower or busy machines."""
    t0 = time.monotonic()
    while not ready():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{step}: not after {time.monotonic() - t0:.1f} s (allowed {timeout:.0f} s)")
        time.sleep(0.1)


# -- the render's ops one at a time: bench/render_ops.py and tests/test_render.py ---------------


def apply_op(name: str, x, args: list[float], fill=(124, 116, 104), interpolation="bicubic"):
    """One RandAugment op on every sample of uint8 `x` (n, 3, S, S), one argument each (the render
    runs the op families through `shards.render.randaugment`)."""
    import torch

    from shards.pixel_ops import blend_factor, blend_ops, lut_argument, lut_ops, warp, warp_coefficients
    from shards.policy import OPS

    n, op = len(x), OPS[name]
    on = {"device": x.device}
    if op.family == "lut":
        code = torch.full((n,), op.code, **on)
        return lut_ops(x, code, torch.tensor([lut_argument(name, a) for a in args], **on))
    if op.family == "blend":
        factor = torch.tensor([blend_factor(a) for a in args], **on)
        return blend_ops(x, torch.full((n,), op.code, **on), factor[:, 0], factor[:, 1])
    coeffs = torch.tensor([warp_coefficients(name, a, x.shape[-1]) for a in args], dtype=torch.int64, **on)
    return warp(x, coeffs, torch.tensor(fill, dtype=torch.uint8, **on), interpolation)


def normalize_and_erase(x, params, policy):
    """uint8 (B, 3, S, S) -> timm's ToTensor + Normalize (looked up, not computed), then erasing."""
    from shards.pixel_ops import normal_lut, normalize
    from shards.plan import BatchPlan
    from shards.render import erase_boxes

    plan = params if isinstance(params, BatchPlan) else BatchPlan.build(params, policy)
    out = normalize(x, normal_lut(tuple(policy.mean), tuple(policy.std), x.device))
    return erase_boxes(out, plan.to(x.device))
