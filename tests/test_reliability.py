"""Faults and hostile input, each reproduced against real processes: a Redis password that must
not leak, damaged shards, Redis and the teacher service dying under a training run, a DDP rank
killed, and the API contract fuzzed by schemathesis."""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis as redispy
from conftest import (
    PY,
    RedisServer,
    communicate,
    copy_shards,
    flip_bit,
    last_json,
    precompute_argv,
    require_redis_server,
    run_cli,
    run_precompute,
    run_step,
    start_service,
    student_argv,
    wait_exit,
    wait_until,
)

from labels.client import TeacherClient
from shards import Manifest
from shards.index import ShardIndex


def trainer_cmd(shards, out, *extra) -> list[str]:
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return [*torchrun, "-m", "student_trainer", "train", *student_argv(shards, out, eval_every=0), *map(str, extra)]


def wait_for_epochs(out, n: int, proc) -> None:
    """Until the trainer has written n epochs' metrics (each ~3 s on the development machine)."""
    path = out / "metrics.jsonl"

    def written() -> bool:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        return path.exists() and len(path.read_text().splitlines()) >= n

    wait_until(f"trainer: {n} epochs in metrics.jsonl", 6 + 3 * n, written)


@pytest.mark.parametrize("form", ["netloc", "query"])
def test_redis_password_never_in_answers_or_logs(demo_shards, tiny_teacher, tmp_path, form):
    """In front of the host (redis://:pw@host) or as a query parameter (redis://host/9?password=pw,
    which redis-py accepts too, and which was shown in full): masked in every answer, log line,
    summary and error."""
    require_redis_server()
    password = "hunter2-Sup3rSecret"
    redis = RedisServer(tmp_path, password=password).start()
    log = tmp_path / "service.log"
    url = redis.url.replace("/0", "/9")
    if form == "query":
        url = f"redis://127.0.0.1:{redis.port}/9?password={password}"
    masked = "***@127.0.0.1" if form == "netloc" else "password=***"
    proc, base = start_service(tiny_teacher, demo_shards, None, log, env={"DISTILL_STORE": url})
    try:
        assert httpx.get(base + "/readyz").status_code == 200
        redis.kill()
        answers = [
            httpx.get(base + "/readyz", timeout=60),
            httpx.post(base + "/v1/labels/lookup", json={"keys": ["a"], "seeds": [0]}, timeout=60),
            httpx.post(base + "/v1/labels", json={"keys": ["a"], "seeds": [0]}, timeout=60),
        ]
        for r in answers:
            assert r.status_code == 503, r.text
            assert password not in r.text and masked in r.text, r.text
    finally:
        proc.terminate()
        wait_exit(proc, "serve stops on SIGTERM", 3)
    assert password not in log.read_text()
    # on a command line a URL with a password is refused before anything runs (`ps` shows it to
    # every user); from the environment (env:NAME) it is used, and errors name it masked
    for store, why in ((url, "on the command line"), ("env:DISTILL_STORE", "unavailable")):
        for argv in (
            ("labels", "stats", store),
            ("labels", "export", store, tmp_path / "x.npz"),
            precompute_argv(demo_shards, "0:1", store, tiny_teacher)[3:],
        ):
            r = run_cli("teacher_service", *argv, check=False, env={"DISTILL_STORE": url})
            out = r.stderr + r.stdout
            assert r.returncode == 2 and password not in out and masked in r.stderr and why in r.stderr, out[-800:]


def test_service_refuses_shards_that_do_not_match_their_manifest(demo_shards, tiny_teacher, tmp_path):
    """A damaged member index, a shard of another size than its manifest says, and shards built
    before indexes: serve names it (or the command that writes the index) and does not start."""

    def serve(shards):
        return run_cli(
            "teacher_service", "serve", "--checkpoint", tiny_teacher, "--shards", shards,
            "--store", tmp_path / "l.db", "--port", "1", check=False, measured_s=8,
        )  # fmt: skip

    damaged_index = copy_shards(demo_shards, tmp_path / "index")
    flip_bit(damaged_index / "train.index", 5000)
    short = copy_shards(demo_shards, tmp_path / "short")
    victim = short / Manifest.load(short).shards("train")[0].name
    victim.write_bytes(victim.read_bytes()[:-1024])
    legacy = copy_shards(demo_shards, tmp_path / "legacy", index=False)
    for shards, named, why in (
        (damaged_index, "train.index", "modified"),
        (short, victim.name, "do not match their manifest"),
        (legacy, "shards index", "has no member index"),
    ):
        r = serve(shards)
        assert r.returncode == 2 and why in r.stderr and named in r.stderr, r.stderr


@pytest.mark.slow
def test_connections_that_send_nothing_or_too_much_are_closed(demo_shards, tiny_teacher, tmp_path):
    """Reliability case 6: a connection that sends nothing, or part of its headers, is closed after
    the header timeout (they were kept forever: 20,000 of them exhausted the descriptors); one that
    stalls in its body, or drips it a byte at a time, is closed once the body timeout has passed
    since its head (2,100 stalled ones were held for 78 s while every valid request got a 503; a
    drip was held forever); a 100 KB header or 100,000 headers get a 400; one client address
    holds at most its bound of connections; connections past the per-worker bound get a 503."""
    env = {
        "DISTILL_HTTP_HEADER_TIMEOUT": "1", "DISTILL_HTTP_BODY_TIMEOUT": "1", "DISTILL_HTTP_MAX_CONNECTIONS": "8",
        "DISTILL_HTTP_MAX_CONNECTIONS_PER_CLIENT": "4",
    }  # fmt: skip
    proc, base = start_service(tiny_teacher, demo_shards, tmp_path / "l.db", tmp_path / "serve.log", env=env)
    port = int(base.rsplit(":", 1)[1])

    def connect(send: bytes = b"", source: str = "127.0.0.1") -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        s.sendall(send)
        return s

    try:
        stalled_body = b"POST /v1/labels HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        stalled_body += b"Content-Length: 1000\r\n\r\n" + b'{"keys": ["a"], "se'
        for start in (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n", stalled_body):
            t0 = time.monotonic()
            assert connect(start).recv(100) == b""  # closed by the service
            assert time.monotonic() - t0 < 5
        # a body dripped a byte every 0.4 s never stalls for the timeout: the timeout bounds the whole
        # body, so it is closed about 1 s after its head (it was held for as long as the drip went on)
        drip = connect(stalled_body)
        drip.settimeout(0.4)
        t0 = time.monotonic()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            while time.monotonic() - t0 < 8:
                drip.sendall(b" ")
                try:
                    if drip.recv(100) == b"":
                        raise ConnectionResetError("closed by the service")
                except TimeoutError:
                    pass
        assert time.monotonic() - t0 < 4
        big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
        many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X: 1\r\n" * 100_000 + b"\r\n"
        for request in (big, many):
            assert connect(request).recv(100).startswith(b"HTTP/1.1 400")
        # one address: 4 connections, the fifth closed at once; the other addresses still served
        mine = [connect(source="127.0.0.2") for _ in range(4)]
        t0 = time.monotonic()
        refused = connect(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "127.0.0.2")
        try:
            assert refused.recv(100) == b""
        except ConnectionResetError:  # closed with the request unread: the kernel resets it
            pass
        assert time.monotonic() - t0 < 1
        idle = mine + [connect(source="127.0.0.3") for _ in range(4)]  # 8: the worker's bound
        assert connect(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "127.0.0.4").recv(100).startswith(b"HTTP/1.1 503")
        for s in idle:
            s.close()
        ok = httpx.get(base + "/healthz", timeout=30)
        assert ok.status_code == 200
    finally:
        proc.terminate()
        wait_exit(proc, "serve stops on SIGTERM", 3)


def test_a_store_that_refuses_writes_is_said_so(demo_shards, tiny_teacher, tmp_path):
    """Reliability case 1: a Redis at its memory limit under noeviction. The service answers the
    labels it computed, says how many were not stored (`unstored`), counts them in a metric and
    turns /readyz 503 until writes are taken again; the client carries the count."""
    require_redis_server()
    srv = RedisServer(tmp_path).start()
    proc, base = start_service(tiny_teacher, demo_shards, srv.url, tmp_path / "serve.log")
    try:
        client = TeacherClient(base)
        keys = list(ShardIndex.load(demo_shards, ["train"]).keys())[:20]
        cli = redispy.Redis(port=srv.port)
        cli.config_set("maxmemory-policy", "noeviction")
        # full from now on: far below what it holds (a limit near it lets a write in whenever the
        # server frees a client buffer)
        cli.config_set("maxmemory", "1")
        batch, errors = client.label(keys, [3] * 20)
        assert batch.present.all() and errors == [None] * 20 and batch.unstored == 20
        assert client.lookup(keys, [3] * 20).present.sum() == 0  # indeed not kept
        ready = httpx.get(base + "/readyz", timeout=30)
        assert ready.status_code == 503 and "refuses writes" in ready.json()["error"]
        assert "distill_labels_unstored_total 20.0" in httpx.get(base + "/metrics", timeout=30).text
        cli.config_set("maxmemory", "0")  # room again
        assert httpx.get(base + "/readyz", timeout=30).status_code == 200
        batch, _ = client.label(keys, [3] * 20)
        assert batch.present.all() and batch.unstored == 0
        assert client.lookup(keys, [3] * 20).present.all()
    finally:
        proc.terminate()
        wait_exit(proc, "serve stops on SIGTERM", 3)
        srv.kill()


def test_the_trainer_rides_out_a_short_redis_outage(demo_shards, tiny_teacher, tmp_path):
    """Redis killed after the first epoch and back 3 s later (AOF): every label trained on is the
    stored one, none missing."""
    require_redis_server()
    redis = RedisServer(tmp_path, persistent=True).start()
    try:
        run_precompute(demo_shards, "0:3", redis.url, tiny_teacher)
        out = tmp_path / "run"
        cmd = trainer_cmd(demo_shards, out, "--labels", "store", "--store", redis.url, "--epochs", 3)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_epochs(out, 1, proc)
        redis.kill()
        time.sleep(3)  # the outage
        redis.start()
        stdout, stderr = communicate(proc, "trainer: the rest of 3 epochs after a Redis outage", 15)
        assert proc.returncode == 0, stderr[-3000:]
        assert "label store unavailable, retrying" in stderr  # the loader waited the outage out
        s = last_json(stdout)
        assert s["labels_missing"] == 0 and s["labels_cached"] == 3 * 1437 and s["steps"] == 3 * 12
    finally:
        redis.kill()


@pytest.mark.slow
def test_a_longer_redis_outage_stops_training_clearly_and_resumes(demo_shards, tiny_teacher, tmp_path):
    require_redis_server()
    redis = RedisServer(tmp_path, persistent=True).start()
    try:
        run_precompute(demo_shards, "0:4", redis.url, tiny_teacher)
        out = tmp_path / "run"
        store = ["--labels", "store", "--store", redis.url, "--epochs", 4]
        proc = subprocess.Popen(
            trainer_cmd(demo_shards, out, *store, "--store-retry-for", 2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for_epochs(out, 1, proc)
        redis.kill()
        _, stderr = communicate(proc, "trainer: give up on Redis after --store-retry-for 2", 5)
        assert proc.returncode != 0 and "ERROR redis store" in stderr and "unavailable" in stderr, stderr[-4000:]
        assert (out / "last.pt").exists()
        redis.start()
        r = run_step(trainer_cmd(demo_shards, out, *store, "--resume", "auto"), "trainer: resume to 4 epochs", 15)
        s = last_json(r.stdout)
        assert s["steps"] == 4 * 12 and s["labels_missing"] == 0
    finally:
        redis.kill()


@pytest.mark.slow
def test_training_continues_through_a_teacher_service_restart(demo_shards, tiny_teacher, tmp_path):
    store = tmp_path / "labels.db"
    log = tmp_path / "service.log"
    proc, url = start_service(tiny_teacher, demo_shards, store, log)
    port = int(url.rsplit(":", 1)[1])
    out = tmp_path / "run"
    train = subprocess.Popen(
        trainer_cmd(demo_shards, out, "--labels", "service", "--service-url", url, "--epochs", 3),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_epochs(out, 1, train)
        proc.send_signal(signal.SIGTERM)
        wait_exit(proc, "serve stops on SIGTERM", 3)
        proc, _ = start_service(tiny_teacher, demo_shards, store, log, port=port)
        stdout, stderr = communicate(train, "trainer: the rest of 3 epochs through a service restart", 25)
        assert train.returncode == 0, stderr[-3000:]
        s = last_json(stdout)
        assert s["labels_missing"] == 0 and s["labels_cached"] == 3 * 1437
    finally:
        train.kill()
        proc.terminate()
        wait_exit(proc, "serve stops on SIGTERM", 3)


@pytest.mark.slow
def test_a_killed_rank_resumes_to_the_same_step_count(demo_shards, tmp_path):
    out = tmp_path / "run"
    cmd = trainer_cmd(demo_shards, out, "--labels", "none", "--epochs", 4)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_epochs(out, 2, proc)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    os.kill(int(ranks[1]), signal.SIGKILL)  # one rank only: torchrun must take the other down
    communicate(proc, "torchrun stops the other rank after a kill -9", 3)
    assert proc.returncode != 0
    r = run_step([*cmd, "--resume", "auto"], "trainer: resume to 4 epochs", 12)
    assert last_json(r.stdout)["steps"] == 4 * 12


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(demo_shards, tiny_teacher, tmp_path):
    """The OpenAPI document is the contract: generated requests (bounded) get only documented
    status codes and bodies that match their schemas; never a 5xx."""
    exe = shutil.which("schemathesis", path=os.path.dirname(PY))
    assert exe, "schemathesis is a dev dependency"
    token = "fuzz-token"
    token_file = tmp_path / "token"
    token_file.write_text(token)
    proc, url = start_service(
        tiny_teacher, demo_shards, tmp_path / "l.db", tmp_path / "service.log", "--token-file", token_file,
        "--max-items", 64,
    )  # fmt: skip
    try:
        r = run_step(
            [exe, "run", url + "/openapi.json", "-H", f"Authorization: Bearer {token}", "--checks", "all",
             "--exclude-checks", "positive_data_acceptance", "--max-examples", "40",
             "--phases", "examples,coverage,fuzzing", "--workers", "2", "--request-timeout", "60", "--seed", "1",
             "--generation-database", "none"],
            "schemathesis run", 10, check=False, cwd=tmp_path,  # its reports stay out of the repository
        )  # fmt: skip
        assert r.returncode == 0, r.stdout[-6000:]
        assert httpx.get(url + "/healthz").status_code == 200
    finally:
        proc.terminate()
        wait_exit(proc, "serve stops on SIGTERM", 3)


@pytest.mark.slow
def test_load_below_the_queue_never_fails_and_above_it_only_503s():
    """bench/load.py, bounded: mixed hits and misses from concurrent clients on loopback."""
    from conftest import ROOT

    r = run_step([PY, ROOT / "bench" / "load.py", "--seconds", "8", "--clients", "6"], "bench/load.py", 36)
    s = last_json(r.stdout)
    below, above = s["below"], s["above"]
    assert below["requests"] >= 20 and below["failures"] == 0, below
    assert above["statuses"].get("503", 0) > 0 and above["non_503_failures"] == 0, above
    assert above["503_without_retry_after"] == 0
    assert s["rss_growth"] < 0.25, s["rss"]


def test_devices_that_cannot_run_a_teacher_are_refused_at_start(demo_shards, tiny_teacher, tmp_path):
    """`--devices meta` started a service that reported ready and hung every miss; `cpu:7` named
    nothing; `cpu,cpu,cpu,cpu` started four engines (6.4 GB) on two cores. Each is refused, with
    the reason, before anything starts (cpu named n times is n CPU engines, at most one a core)."""
    import torch

    from distill_core import usable_cpus

    over = usable_cpus() + 1
    cases = [
        ("meta", "a teacher runs on cpu or cuda"),
        ("cpu:7", "there is one CPU device"),
        (",".join(["cpu"] * over), f"names cpu {over} times: {over} engines"),
    ]
    if not torch.cuda.is_available():
        cases.append(("cuda:0", "this machine has no CUDA device"))
    for devices, why in cases:
        r = run_cli(
            "teacher_service", "serve", "--checkpoint", tiny_teacher, "--shards", demo_shards,
            "--store", tmp_path / "l.db", "--devices", devices, "--port", "1", check=False, measured_s=8,
        )  # fmt: skip
        assert r.returncode == 2 and why in r.stderr, (devices, r.stderr[-1000:])
    r = run_precompute(demo_shards, "0:1", tmp_path / "p.db", tiny_teacher, "--device", "meta", check=False)
    assert r.returncode == 2 and "a teacher runs on cpu or cuda" in r.stderr, r.stderr[-1000:]


def tensor_bytes(checkpoint: Path) -> tuple[int, int]:
    """(offset, size) in the file of the largest tensor torch.save stored: its zip keeps tensors
    uncompressed, each after a local header of 30 bytes, the name and an extra field."""
    import struct
    import zipfile

    with zipfile.ZipFile(checkpoint) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(checkpoint, "rb") as f:
        f.seek(info.header_offset)
        name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_a_damaged_checkpoint_is_refused_and_a_failed_write_leaves_the_last_one(demo_shards, tmp_path):
    """64 flipped bytes inside last.pt's largest tensor: --resume and --eval refuse it with one line
    naming the file (it resumed, 17 values of an optimizer tensor changed, exit 0). A checkpoint
    write that fails (the process's file-size limit, as a full disk does) is one ERROR line; the
    previous last.pt stays, whole, and no temporary is left (it was torch's "basic_ios::clear"
    traceback and a last.pt.tmp)."""
    import resource

    from distill_core import load_training_checkpoint

    out = tmp_path / "run"
    train = [PY, "-m", "student_trainer", "train", *student_argv(demo_shards, out, epochs=1, eval_every=0)]
    run_step(train, "train 1 epoch", 6)
    ckpt = out / "last.pt"
    good = ckpt.read_bytes()
    offset, size = tensor_bytes(ckpt)
    damaged = bytearray(good)
    for i in range(offset + size // 2, offset + size // 2 + 64):
        damaged[i] ^= 0x5A
    ckpt.write_bytes(bytes(damaged))
    resume = [PY, "-m", "student_trainer", "train", *student_argv(demo_shards, out, epochs=2, eval_every=0),
              "--resume", "auto"]  # fmt: skip
    for argv, what in ((resume, "resume"), ([PY, "-m", "student_trainer", "train", "--shards", demo_shards, "--eval",
                                             "--resume", ckpt, "--workers", "0"], "eval")):  # fmt: skip
        r = run_step(argv, f"{what} from a damaged checkpoint", 5, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"ERROR checkpoint {ckpt} is damaged" in r.stderr, r.stderr[-2000:]
    ckpt.write_bytes(good)

    def small_files():  # every file this process writes is cut at 200 KB (EFBIG), as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    in_process = [*resume, "--workers", "0"]  # loader workers pass batches through files in /dev/shm
    r = run_step(in_process, "resume with writes cut at 200 KB", 6, check=False, preexec_fn=small_files)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"ERROR cannot write {ckpt}: File too large" in r.stderr, r.stderr[-2000:]
    assert ckpt.read_bytes() == good and load_training_checkpoint(ckpt)["epoch"] == 0
    assert sorted(p.name for p in out.iterdir() if "tmp" in p.name) == []


def swap_two_images(shard: Path) -> tuple[str, str]:
    """Rewrite `shard` in place with the bytes of two of its images swapped under their keys. The
    two take the same number of 512-byte tar blocks, so the file keeps its size and every other
    member its offset: what a size check cannot see."""
    import io
    import tarfile

    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read() if m.isreg() else None) for m in tf.getmembers()]
    images = [i for i, (m, _) in enumerate(members) if m.name.endswith((".png", ".jpg"))]
    blocks = lambda i: -(-members[i][0].size // 512)  # noqa: E731
    a, b = next((a, b) for a in images for b in images if a < b and blocks(a) == blocks(b))
    members[a], members[b] = (members[a][0], members[b][1]), (members[b][0], members[a][1])
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tw:
        for m, data in members:
            m.size = len(data) if data is not None else m.size
            tw.addfile(m, io.BytesIO(data) if data is not None else None)
    old = shard.stat().st_size
    shard.write_bytes(out.getvalue()[:old].ljust(old, b"\0"))  # tar's end padding absorbs the rest
    return members[a][0].name, members[b][0].name


def test_labels_are_bound_to_the_bytes_they_were_made_from(demo_shards, tiny_teacher, tmp_path):
    """A shard rewritten in place with two images' bytes swapped (the manifest and index unchanged,
    the file the same size): the trainer stops at the first read of a changed image, naming the
    shard and the image (it trained to exit 0 on labels of other pixels). Shards built again from
    a folder whose images changed (a new manifest): the trainer, precompute and the service refuse
    them before any work, naming the shard (the labels of the old bytes were kept under the same keys)."""
    shards = copy_shards(demo_shards, tmp_path / "shards")
    store = tmp_path / "labels.db"
    run_precompute(shards, "0:1", store, tiny_teacher)
    m = Manifest.load(shards)
    shard = shards / m.shards("train")[0].name
    swap_two_images(shard)

    def train(shards, out, store):
        fields = dict(labels="store", store=str(store), epochs=1, eval_every=0)
        return [PY, "-m", "student_trainer", "train", *student_argv(shards, tmp_path / out, **fields)]

    r = run_step(train(shards, "run", store), "train on a shard rewritten in place", 8, check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr.splitlines()[-1], r.stderr[-2000:]
    assert f"shard {shard} changed after it was indexed" in r.stderr, r.stderr[-2000:]

    folder = tmp_path / "images"
    run_cli("shards", "example-folder", "--out", folder)
    built = tmp_path / "built"
    build = ["shards", "build", "--src", folder / "train", "--out", built, "--input-size", "32", "--no-progress"]
    run_cli(*build)
    store = tmp_path / "built.db"
    run_precompute(built, "0:1", store, tiny_teacher)
    a, b = sorted((folder / "train" / "3").iterdir())[:2]  # two images swap contents, keys stay
    data_a = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data_a)
    run_cli(*build)
    changed = [s.name for s in Manifest.load(built).shards("train")]
    r = run_step(train(built, "run2", store), "train on rebuilt shards", 8, check=False)
    assert r.returncode == 2 and "changed since their labels were made" in r.stderr, r.stderr[-2000:]
    assert any(name in r.stderr for name in changed)
    r = run_step(precompute_argv(built, "0:2", store, tiny_teacher), "precompute over rebuilt shards", 8, check=False)
    assert r.returncode == 2 and "changed since their labels were made" in r.stderr, r.stderr[-2000:]
    r = run_cli("teacher_service", "serve", "--checkpoint", tiny_teacher, "--shards", built, "--store", store,
                "--port", "1", check=False, measured_s=8)  # fmt: skip
    assert r.returncode == 2 and "changed since their labels were made" in r.stderr, r.stderr[-2000:]


@pytest.mark.unit
def test_the_uvicorn_internals_the_limits_read_are_there():
    """The connection limits (teacher_service/app/connections.py) read uvicorn's h11 protocol's
    internals. On a protocol of the pinned release, fed the head of a request and part of its body
    through a stand-in transport, each is where the limits look for it; a uvicorn that moved one
    fails here by name, not silently in a service that no longer bounds its connections."""
    import asyncio

    import uvicorn
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from teacher_service.app.connections import GuardedH11Protocol

    async def app(scope, receive, send):  # reads nothing: the body stays incomplete
        await asyncio.sleep(10)

    class Transport(asyncio.Transport):
        def __init__(self):
            super().__init__()
            self.closed = False

        def get_extra_info(self, name, default=None):
            return {"peername": ("127.0.0.1", 9), "sockname": ("127.0.0.1", 8000)}.get(name, default)

        def write(self, data):
            pass

        def is_closing(self):
            return self.closed

        def close(self):
            self.closed = True

        def pause_reading(self):
            pass

        def resume_reading(self):
            pass

    async def exercise():
        config = Config(app=app, http=GuardedH11Protocol, lifespan="off")
        config.load()
        config.header_timeout, config.body_timeout = 5.0, 5.0
        protocol = GuardedH11Protocol(config=config, server_state=ServerState(), app_state={})
        protocol.connection_made(Transport())
        protocol.data_received(b'POST /v1/labels HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"keys')
        await asyncio.sleep(0)
        missing = []
        for owner, name in ((protocol, "cycle"), (protocol, "flow"), (protocol, "conn"), (protocol, "loop")):
            if not hasattr(owner, name):
                missing.append(f"H11Protocol.{name}")
        cycle = getattr(protocol, "cycle", None)
        for name in ("more_body", "response_complete"):
            if cycle is None or not hasattr(cycle, name):
                missing.append(f"RequestResponseCycle.{name}")
        if not hasattr(getattr(protocol, "flow", None), "read_paused"):
            missing.append("FlowControl.read_paused")
        more = getattr(cycle, "more_body", None)
        deadline = protocol._body_deadline is not None
        protocol.connection_lost(None)
        return missing, more, deadline

    missing, more_body, body_deadline = asyncio.run(exercise())
    assert not missing, f"uvicorn {uvicorn.__version__} moved what the connection limits read: {missing}"
    assert more_body is True and body_deadline  # the body is incomplete, and its deadline runs
