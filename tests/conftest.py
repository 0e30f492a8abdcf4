import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from distill_core import free_port, to_argv  # noqa: F401 (free_port: the tests' helper, one implementation)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# The tests' student: deit_tiny_distilled_patch16_224's layout shrunk to seconds an epoch on 32 px digits
TINY = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}

# -- wall-clock budgets ------------------------------------------------------------------------------
# Every wait in these tests has a budget: the seconds the step took on the 2-core development machine
# when it was quiet (`measured_s`, written beside each wait), times TIME_FACTOR, and never under
# MIN_BUDGET_S. The factor covers a machine twice as slow with other work beside it: with the whole
# suite pinned to one core (taskset -c 0) no step took more than 2.2x its quiet time, and the
# compose test beside two CPU hogs took 3x.
# A budget that runs out names the step, how long it ran and what it was measured at; the summary at
# the end of a run lists the steps that used the largest share of their budget, and
# DISTILL_TEST_STEP_TIMES=FILE writes every step's time as JSON.
TIME_FACTOR = float(os.environ.get("DISTILL_TEST_TIME_FACTOR", "8"))
MIN_BUDGET_S = 30.0
STEP_TIMES: list[tuple[str, float, float]] = []  # (step, measured_s, took_s) of this session


class StepTimeout(AssertionError):
    """A step of a test ran out of its wall-clock budget."""


def budget_s(measured_s: float) -> float:
    """Seconds allowed for a step that took `measured_s` on the development machine."""
    return max(MIN_BUDGET_S, measured_s * TIME_FACTOR)


class Budget:
    """The clock of one step: started on creation, `fail()` raises StepTimeout with the figures."""

    def __init__(self, step: str, measured_s: float):
        self.step, self.measured_s, self.seconds = step, measured_s, budget_s(measured_s)
        self.t0 = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def expired(self) -> bool:
        return self.elapsed > self.seconds

    def done(self) -> float:
        took = self.elapsed
        STEP_TIMES.append((self.step, self.measured_s, took))
        return took

    def fail(self, detail: str = ""):
        raise StepTimeout(
            f"{self.step}: not done after {self.elapsed:.1f} s (budget {self.seconds:.0f} s = {TIME_FACTOR:g} x "
            f"the {self.measured_s:g} s it took on the 2-core development machine; DISTILL_TEST_TIME_FACTOR "
            f"raises it)" + (f"\n{detail}" if detail else "")
        )


def wait_until(step: str, measured_s: float, condition: Callable[[], bool], interval: float = 0.2,
               detail: Callable[[], str] = lambda: "") -> float:  # fmt: skip
    """Poll `condition` until it holds (returns the seconds it took) or the step's budget runs out."""
    clock = Budget(step, measured_s)
    while not condition():
        if clock.expired():
            clock.fail(detail())
        time.sleep(interval)
    return clock.done()


def communicate(proc: subprocess.Popen, step: str, measured_s: float) -> tuple[str, str]:
    """proc.communicate() within the step's budget; on time-out the process is killed and its output shown."""
    clock = Budget(step, measured_s)
    try:
        out, err = proc.communicate(timeout=clock.seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        clock.fail(tail(out, err))
    clock.done()
    return out, err


def wait_exit(proc: subprocess.Popen, step: str, measured_s: float) -> int:
    """proc.wait() within the step's budget (the process is killed when it runs out)."""
    clock = Budget(step, measured_s)
    try:
        rc = proc.wait(timeout=clock.seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        clock.fail()
    clock.done()
    return rc


def tail(out, err, n: int = 3000) -> str:
    """The last n characters of a process's stdout and stderr (text or bytes), for a failure message."""

    def text(b) -> str:
        return b.decode(errors="replace") if isinstance(b, bytes) else b or ""

    return f"stdout:\n{text(out)[-n:]}\nstderr:\n{text(err)[-n:]}"


def run_step(argv: list, step: str, measured_s: float, check: bool = True, env=None, **kw):
    """subprocess.run(argv) with text output, within the step's budget; `check`: exit code 0."""
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    e.update(env or {})
    proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=e, **kw)  # fmt: skip
    out, err = communicate(proc, step, measured_s)
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and p.returncode != 0:
        raise AssertionError(f"{step}: exited {p.returncode}\n{tail(out, err)}")
    return p


def run_cli(*args, check=True, env=None, measured_s: float = 30.0, step: str | None = None, **kw):
    """Run `python -m ...` as a real subprocess within its budget (by default 30 s measured: the short
    commands here take under 10 s; training runs give their own); returns CompletedProcess (text)."""
    step = step or " ".join(map(str, args[:2]))
    return run_step([PY, "-m", *args], step, measured_s, check=check, env=env, **kw)


# -- what a model learned ----------------------------------------------------------------------------
# A figure a trained model reaches differs by CPU (vector units and oneDNN kernels round differently,
# and training amplifies it): a test bounds it with a margin, never at the figure this machine
# reached. `learned` asserts the bound and records the figure; the end of a run prints every one
# with its margin, and DISTILL_TEST_LEARNED=FILE writes them as JSON (docs/testing.md: how to see
# another CPU's arithmetic here).
LEARNED: list[dict] = []


def learned(what: str, value: float, *, above: float | None = None, below: float | None = None) -> None:
    """Assert above < value < below (either bound may be absent) and record the figure's margin."""
    margin = min(m for m in (value - above if above is not None else None,
                             below - value if below is not None else None) if m is not None)  # fmt: skip
    LEARNED.append({"what": what, "value": value, "above": above, "below": below, "margin": margin,
                    "setting": arithmetic_setting()})  # fmt: skip
    assert margin > 0, f"{what}: {value} is not within ({above}, {below})"


def arithmetic_setting() -> str:
    """The environment variables that change this process's float kernels (none: the CPU's own)."""
    keys = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
    return " ".join(f"{k}={os.environ[k]}" for k in keys if os.environ.get(k)) or "native"


def pytest_terminal_summary(terminalreporter):
    if LEARNED:
        import json

        if path := os.environ.get("DISTILL_TEST_LEARNED"):
            Path(path).write_text(json.dumps(LEARNED))
        terminalreporter.write_line(f"learned figures ({arithmetic_setting()}), smallest margin first:")
        scale = lambda r: max(abs(r["value"]), abs(r["above"] or 0), abs(r["below"] or 0), 1e-12)  # noqa: E731
        for r in sorted(LEARNED, key=lambda r: r["margin"] / scale(r)):
            bounds = f"({r['above']}, {r['below']})"
            terminalreporter.write_line(f"  {r['what']}: {r['value']:.6g} in {bounds}, margin {r['margin']:.3g}")
    if not STEP_TIMES:
        return
    if path := os.environ.get("DISTILL_TEST_STEP_TIMES"):  # every step's time, to re-measure the budgets' base
        import json

        Path(path).write_text(
            json.dumps([{"step": s, "measured_s": m, "took_s": round(t, 2)} for s, m, t in STEP_TIMES])
        )
    worst = sorted(STEP_TIMES, key=lambda s: s[2] / budget_s(s[1]), reverse=True)[:5]
    terminalreporter.write_line(
        f"wall-clock budgets (x{TIME_FACTOR:g} the development machine's times): {len(STEP_TIMES)} steps, most used: "
        + "; ".join(f"{s} {took:.1f}/{budget_s(m):.0f} s" for s, m, took in worst)
    )


def precompute_argv(shards, seeds: str | None, store, teacher, *extra) -> list[str]:
    """`python -m teacher_service precompute --no-progress` over `shards` with a teacher checkpoint
    (`seeds` None: the schedule flags in `extra` say what to label)."""
    from labels.teacher import TeacherSettings
    from teacher_service.precompute import PrecomputeConfig

    job = dict(shards=str(shards), store=str(store), teacher=TeacherSettings(checkpoint=str(teacher)), progress=False)
    job.update({"seeds": seeds} if seeds is not None else {})
    return [
        PY,
        "-m",
        "teacher_service",
        "precompute",
        *to_argv(PrecomputeConfig.model_construct(**job)),
        *map(str, extra),
    ]


def student_argv(shards, out=None, **fields) -> list[str]:
    """`student_trainer train`'s arguments for the tests' student (TINY) on the demo digits: one
    repeat, one loader worker and thread, no warm-up; `fields` (TrainConfig's) on top."""
    from student_trainer import TrainConfig

    base = dict(
        shards=str(shards), model="deit_tiny_distilled_patch16_224", model_kwargs=TINY, batch_size=64,
        repeated_aug=1, workers=1, threads=1, warmup_epochs=0, lr=4e-3, drop_path=0.0, progress=False,
    )  # fmt: skip
    base.update({"out": str(out)} if out is not None else {})
    return to_argv(TrainConfig.model_construct(**{**base, **fields}))


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


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """The demo digits as shards of 128, built in process (the CLI's build is tested on its own)."""
    from shards.build import BuildConfig, build

    out = tmp_path_factory.mktemp("shards")
    build(BuildConfig(out=out, demo="digits", shard_size=128))
    return out


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request, monkeypatch):
    """A test marked `unit` that starts a process (subprocess, multiprocessing, a loader worker)
    fails: the unit tier stays in process and under a minute."""
    if request.node.get_closest_marker("unit") is None:
        return

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} is marked unit but starts a process: mark it otherwise")

    import multiprocessing.process

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)


def copy_shards(src: Path, dst: Path, index: bool = True) -> Path:
    """A copy of a shard set to damage; index=False: as built before member indexes (the manifest
    lists none, so readers walk the tar headers)."""
    import json

    shutil.copytree(src, dst)
    if not index:
        manifest = json.loads((dst / "manifest.json").read_text())
        for split in manifest.pop("indexes", {}):
            (dst / f"{split}.index").unlink()
        (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def flip_tar_header_bit(shard: Path, member: int) -> None:
    """Flip one bit of the checksum of the `member`-th tar header of `shard`: Python's tarfile
    ends its iteration there, quietly (the members before it read fine)."""
    import tarfile

    with tarfile.open(shard) as tf:
        header = [ti.offset for ti in tf][member]
    data = bytearray(shard.read_bytes())
    data[header + 148] ^= 0x01
    shard.write_bytes(bytes(data))


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


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

        def answers() -> bool:
            try:
                return redis.Redis(port=self.port, password=self.password).ping()
            except redis.RedisError:
                return False

        wait_until("redis-server answers PING", 0.1, answers, interval=0.05)
        return self

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


@pytest.fixture(params=[pytest.param("file", marks=pytest.mark.unit), "redis"])
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
    from shards import Manifest, ShardStream, StreamOptions

    torch.manual_seed(0)
    m = Manifest.load(demo_shards)
    kwargs = {"num_classes": 10}
    model = timm.create_model("regnety_002", **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = ShardStream(
        demo_shards, "train", m.policy(), options=StreamOptions(mode="eval", shuffle=True), batch_size=64
    )
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
    from labels.teacher import TeacherSettings
    from teacher_service.local import LocalService, serve_argv

    fields = {"shards": str(shards), "teacher": TeacherSettings(checkpoint=str(teacher))}
    fields.update({"store": str(store)} if store is not None else {})
    service = LocalService([*serve_argv(**fields), *map(str, flags)], Path(log_path), port=port, env=env).launch()
    wait_service_ready(service, "serve: launch to /readyz")
    return service.proc, service.url


def wait_service_ready(service, step: str, measured_s: float = 10.0):
    """Until a launched `LocalService` answers /readyz 200 within the step's budget; the log's tail
    when it exits or runs out of time (then it is killed)."""
    try:
        wait_until(step, measured_s, service.is_ready, interval=0.25, detail=service.tail)
    except (AssertionError, RuntimeError):  # StepTimeout too
        service.proc.kill()
        raise


def descendants(pid: int) -> list[int]:
    """Every process below `pid`."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def still_running(pids: list[int], step: str = "processes exit", measured_s: float = 2.0) -> list[int]:
    """Those of `pids` still running (zombies count as gone) once the step's budget has passed."""

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    clock = Budget(step, measured_s)
    while (alive := [p for p in pids if running(p)]) and not clock.expired():
        time.sleep(0.2)
    if not alive:
        clock.done()
    return alive


def engines_directory(pids: list[int]) -> str:
    """The private directory of a service's engines: from its HTTP workers' environment, or from
    the queue-depth files its processes map (an HTTP worker in the supervisor's own process)."""
    from teacher_service.engine.processes import ADDRESSES_ENV

    for pid in pids:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        if sockets := env.get(ADDRESSES_ENV.encode()):
            return os.path.dirname(sockets.decode().split(",")[0])
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                if line.rstrip().endswith(".sock.depth"):
                    return os.path.dirname(line.split()[-1])
    raise AssertionError("no process of the service names its engines' sockets")


def open_loader(shards, labels, *, rank=0, world_size=1, device="cpu", render_on_device=None, **fields):
    """labeled_loader over a store path or a service URL, with DataConfig `fields` (the trainer's flags)."""
    from student_trainer import DataConfig, labeled_loader

    url = str(labels)
    source = {"labels": "service", "service_url": url} if url.startswith("http") else {"labels": "store", "store": url}
    cfg = DataConfig(shards=str(shards), **source, **fields)
    return labeled_loader(cfg, rank=rank, world_size=world_size, device=device, render_on_device=render_on_device)
