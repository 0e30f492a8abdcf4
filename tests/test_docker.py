"""`docker compose` for real, as a new user runs it: `docker compose build`, then the documented
path: the `shards` job -> `teacher-train` (a short schedule) -> `up -d` (redis + teacher healthy)
-> `precompute` into the compose Redis -> `train` (2 processes, labels from Redis, misses from
the service) -> a label through the published port -> `down -v`.

It needs a running Docker engine, the compose plugin and the base images (stand-ins built locally
where no registry is reachable: tests/docker/); `.ci/setup-docker` installs and starts them (CI
runs it), the test installs and starts nothing. Under CI=true a missing piece is a failure;
elsewhere the test skips with a one-line reason. torch and torchvision are installed in the image from the index this
machine's pip uses (read from pip's configuration, served on loopback for the build), at the
versions this test's own Python has.
"""

from __future__ import annotations

import functools
import http.server
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import ROOT, budget_s, free_port, last_json, run_step, wait_until

# the whole path took about 300 s here (engine, base images and build cache in place); each step has
# its own budget below, this is the backstop for a step that has none
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(budget_s(300))]

PROJECT = "distilltest"
BASE_IMAGES = ("python:3.11-slim", "redis:7-alpine")  # what docker/Dockerfile and docker-compose.yml start from
TIMINGS: dict[str, float] = {}


def unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"docker test cannot run: {reason}")
    pytest.skip(reason)


def sh(*cmd, check=True, timeout=1800, env=None, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def docker_ready() -> bool:
    return shutil.which("docker") is not None and sh("docker", "info", check=False, timeout=30).returncode == 0


def require_engine() -> None:
    """A running engine with the compose plugin and the base images, or skip (fail under CI)."""
    if not docker_ready():
        unavailable("no Docker engine runs (as root: bash .ci/setup-docker installs and starts one)")
    if sh("docker", "compose", "version", check=False).returncode != 0:
        unavailable("the docker compose plugin is missing (bash .ci/setup-docker installs it)")
    missing = [i for i in BASE_IMAGES if sh("docker", "image", "inspect", i, check=False).returncode != 0]
    if missing:
        unavailable(f"base images {missing} are missing (bash .ci/setup-docker builds them)")


def pip_index_roots() -> list[Path]:
    """The local package indexes this machine's pip uses (file:// index URLs in pip's config)."""
    config = sh("python3", "-m", "pip", "config", "list", check=False).stdout
    roots = []
    for url in re.findall(r"file://(/[^\s'\"]+)", config):
        simple = Path(url.rstrip("/"))
        if (simple.parent / simple.name).is_dir():
            roots.append(simple)
    return roots


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # one line per wheel fetched is noise in the test's output
        pass


class LoopbackIndex:
    """Serves local index directories over HTTP on 127.0.0.1, for a build with the host's network."""

    def __init__(self, roots: list[Path]):
        self.base = Path(tempfile.mkdtemp(prefix="pip-index-"))
        for i, simple in enumerate(roots):  # each index's `simple/` and the files it links to, side by side
            (self.base / f"i{i}").symlink_to(simple.parent)
        self.names = [f"i{i}/{simple.name}" for i, simple in enumerate(roots)]
        handler = functools.partial(_QuietHandler, directory=str(self.base))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/{name}/"

    def close(self) -> None:
        self.server.shutdown()
        shutil.rmtree(self.base, ignore_errors=True)


def pip_default_index() -> str:
    """The index pip uses when its configuration names none (read from pip, not written here)."""
    configured = sh("python3", "-m", "pip", "config", "get", "global.index-url", check=False).stdout.strip()
    if configured:
        return configured
    return sh("python3", "-c", "from pip._internal.models.index import PyPI; print(PyPI.simple_url)").stdout.strip()


def torch_index(index: LoopbackIndex) -> tuple[str, list[str]]:
    """(the index that holds this Python's torch wheel, the indexes for everything else: the other
    local ones, then pip's default for what no local index has)."""
    version = importlib.metadata.version("torch").split("+")[0]
    for name in index.names:
        page = index.base / name / "torch" / "index.html"
        if page.exists() and f"torch-{version}-" in page.read_text():
            return index.url(name), [index.url(n) for n in index.names if n != name] + [pip_default_index()]
    unavailable(f"no local index holds torch {version} (pip config: file:// index URLs)")


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    work = tmp_path_factory.mktemp("docker")
    require_engine()
    index = None
    try:
        index = LoopbackIndex(pip_index_roots())
        torch_url, extra = torch_index(index)
        packages = " ".join(f"{p}=={importlib.metadata.version(p).split('+')[0]}" for p in ("torch", "torchvision"))
        port = free_port()
        build = {
            "network": "host",  # the loopback index; the image itself runs on compose's network
            "args": {"TORCH_INDEX": torch_url, "TORCH_PACKAGES": packages, "PIP_EXTRA_INDEX_URL": " ".join(extra)},
        }
        base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]

        def short(name: str, flag: str, value: str) -> list[str]:
            cmd = list(base[name]["command"])
            cmd[cmd.index(flag) + 1] = value
            return cmd

        override = {
            "services": {
                **{s: {"build": build} for s in ("teacher", "shards", "teacher-train", "precompute", "train")},
                "teacher": {"build": build, "ports": [f"127.0.0.1:{port}:8000"]},
                "teacher-train": {"build": build, "command": short("teacher-train", "--epochs", "2")},
                "precompute": {"build": build, "command": short("precompute", "--epochs", "2")},
                "train": {"build": build, "command": short("train", "--epochs", "2")},
            }
        }
        text = yaml.safe_dump(override).replace("ports:", "ports: !override")
        (work / "compose.test.yml").write_text(text)
        files = ["-f", ROOT / "docker-compose.yml", "-f", work / "compose.test.yml"]
        run = functools.partial(sh, "docker", "compose", "-p", PROJECT, *files, cwd=ROOT)
        yield {"run": run, "port": port, "work": work}
    finally:
        if docker_ready():
            sh("docker", "compose", "-p", PROJECT, "-f", ROOT / "docker-compose.yml", "down", "-v", "--remove-orphans",
               check=False, cwd=ROOT)  # fmt: skip
        if index is not None:
            index.close()
        print("docker timings: " + json.dumps(TIMINGS))


def wait_healthy(run, services: list[str], measured_s: float) -> float:
    health: dict = {}

    def healthy() -> bool:
        rows = [json.loads(line) for line in run("ps", "--format", "json").stdout.splitlines() if line.strip()]
        health.update({r["Service"]: r.get("Health", "") for r in rows})
        return all(health.get(s) == "healthy" for s in services)

    def detail() -> str:
        return f"health: {health}\n" + run("logs", "--tail", "50").stdout[-3000:]

    return wait_until(f"compose up: {' and '.join(services)} healthy", measured_s, healthy, 3, detail)


# seconds each step took here on the 2-core development machine (engine and build cache in place)
STEP_SECONDS = {"build": 109, "shards": 4, "teacher-train": 14, "up": 19, "precompute": 10, "train": 13, "down": 3}


def test_compose_user_path(compose):
    run = compose["run"]  # `docker compose -p PROJECT -f ... -f ...`, as a partial of sh()

    def step(name: str, *args: str) -> subprocess.CompletedProcess:  # within the step's budget, exit code 0
        return run_step([*run.args, *args], f"docker compose {' '.join(args)}", STEP_SECONDS[name], cwd=ROOT)

    t = time.perf_counter()
    step("build", "build")
    TIMINGS["build_s"] = round(time.perf_counter() - t, 1)
    sizes = sh("docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}").stdout
    TIMINGS["image"] = next((line for line in sizes.splitlines() if line.startswith("distill-service:")), "?")

    def job(name: str) -> dict:
        t = time.perf_counter()
        p = step(name, "run", "--rm", name)
        TIMINGS[f"{name}_s"] = round(time.perf_counter() - t, 1)
        return last_json(p.stdout)

    shards = job("shards")
    assert shards["samples"] == {"train": 1437, "val": 360}
    teacher = job("teacher-train")
    assert teacher["epochs_done"] == 2
    t = time.perf_counter()
    step("up", "up", "-d")
    wait_healthy(run, ["redis", "teacher"], STEP_SECONDS["up"])
    TIMINGS["up_healthy_s"] = round(time.perf_counter() - t, 1)
    pre = job("precompute")
    assert pre["ok"] and pre["labels_computed"] == 1437 * 2
    train = job("train")
    assert train["steps"] > 0 and train["world_size"] == 2 and train["labels_missing"] == 0
    assert train["labels_cached"] > 0
    base = f"http://127.0.0.1:{compose['port']}"
    info = httpx.get(base + "/v1/teacher", timeout=30).json()
    assert info["namespace"] == pre["namespace"] and info["teacher_id"] == pre["teacher"]  # one teacher, one digest
    r = httpx.post(base + "/v1/labels/lookup", json={"keys": ["digits/3/00003"], "seeds": [0]}, timeout=30)
    assert r.status_code == 200 and r.json()["labels"][0] is not None
    t = time.perf_counter()
    step("down", "down", "-v")
    TIMINGS["down_s"] = round(time.perf_counter() - t, 1)
