import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def run_cli(*args, check=True, env=None, timeout=600, **kw):
    """Run `python -m ...` as a real subprocess; returns CompletedProcess with text output."""
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    e.update(env or {})
    p = subprocess.run([PY, "-m", *map(str, args)], capture_output=True, text=True, env=e, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


def precompute_argv(shards, seeds: str, store, teacher, *extra) -> list[str]:
    """`python -m teacher_service precompute --no-progress` over `shards` with a teacher checkpoint."""
    flags = ["--shards", shards, "--seeds", seeds, "--store", store, "--checkpoint", teacher, "--no-progress"]
    return [PY, "-m", "teacher_service", "precompute", *map(str, flags), *map(str, extra)]


def run_precompute(shards, seeds: str, store, teacher, *extra, **kw):
    """Precompute as a subprocess, to its end (see precompute_argv)."""
    return run_cli(*precompute_argv(shards, seeds, store, teacher, *extra)[2:], **kw)


def last_json(text: str) -> dict:
    import json

    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output:\n{text[-2000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    run_cli("shards", "build", "--demo", "digits", "--out", out, "--shard-size", "128")
    return out


class RedisServer:
    """A real redis-server of our own on a free port, that tests may kill and restart."""

    def __init__(self, workdir: Path, persistent: bool = False, password: str | None = None):
        self.port = free_port()
        self.workdir = workdir
        self.persistent = persistent
        self.password = password
        self.proc = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self):
        exe = shutil.which("redis-server")
        # persistent: an append-only file fsynced on every write, so kill -9 loses nothing acknowledged
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        auth = ["--requirepass", self.password] if self.password else []
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *aof,
                *auth,
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                redis.Redis(port=self.port, password=self.password).ping()
                return self
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self):
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def require_redis_server():
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is required under CI (apt-get install redis-server)")
        pytest.skip("redis-server not installed (apt-get install redis-server)")


@pytest.fixture
def redis_server(tmp_path):
    require_redis_server()
    srv = RedisServer(tmp_path).start()
    yield srv
    srv.kill()


@pytest.fixture
def persistent_redis(tmp_path):
    require_redis_server()
    srv = RedisServer(tmp_path, persistent=True).start()
    yield srv
    srv.kill()


@pytest.fixture(params=["file", "redis"])
def store_url(request, tmp_path):
    """A fresh store URL of each backend (real redis-server of the test's own)."""
    if request.param == "file":
        yield str(tmp_path / "labels.db")
    else:
        require_redis_server()
        srv = RedisServer(tmp_path).start()
        yield srv.url
        srv.kill()


@pytest.fixture(scope="session")
def tiny_teacher(demo_shards, tmp_path_factory) -> Path:
    """A small RegNetY trained for a few seconds on the demo digits (real data, real labels)."""
    import timm
    import torch

    from distill_core import save_weights
    from shards import Manifest, ShardStream

    torch.manual_seed(0)
    m = Manifest.load(demo_shards)
    kwargs = {"num_classes": 10}
    model = timm.create_model("regnety_002", **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = ShardStream(demo_shards, "train", m.policy(), batch_size=64, mode="eval", shuffle=True)
    model.train()
    for epoch in range(3):
        stream.set_epoch(epoch)
        for b in stream:
            loss = torch.nn.functional.cross_entropy(model(b["image"]), b["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    meta = {"model": "regnety_002", "model_kwargs": kwargs, "num_classes": 10, "classes": m.classes}
    return save_weights(model.state_dict(), path, meta)


def start_service(teacher, shards, store, log_path: Path, *flags, env: dict | None = None, port: int | None = None):
    """A real `serve` (supervisor, label engines, uvicorn) on a free port (or `port`): (process, url)
    once ready. `store` None: the environment names it (DISTILL_STORE, for a URL with a password)."""
    from teacher_service.client import ServiceError, TeacherClient

    port = port or free_port()
    with open(log_path, "a") as log:
        cmd = [PY, "-m", "teacher_service", "serve", "--checkpoint", teacher, "--shards", shards]
        cmd += ["--store", store] if store is not None else []
        proc = subprocess.Popen(
            [*map(str, cmd), "--port", str(port), *map(str, flags)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        TeacherClient(url).wait_ready(180)
    except ServiceError:
        proc.kill()
        raise AssertionError(Path(log_path).read_text()[-3000:]) from None
    return proc, url


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from ps."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for p, pp in zip(out[::2], out[1::2]):
        children.setdefault(int(pp), []).append(int(p))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def still_running(pids: list[int], grace: float = 10.0) -> list[int]:
    """Those of `pids` still running (zombies count as gone) after up to `grace` seconds."""

    def running(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/status") as f:
                return "zombie" not in next(line for line in f if line.startswith("State:")).lower()
        except (OSError, StopIteration):
            return False

    deadline = time.time() + grace
    while (alive := [p for p in pids if running(p)]) and time.time() < deadline:
        time.sleep(0.2)
    return alive
