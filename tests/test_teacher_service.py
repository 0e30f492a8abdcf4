import io
import json
import os
import signal
import subprocess
import time

import httpx
import pytest
import torch
from conftest import (
    copy_shards,
    descendants,
    engines_directory,
    flip_tar_header_bit,
    free_port,
    last_json,
    learned,
    precompute_argv,
    run_precompute,
    start_service,
    still_running,
    wait_exit,
    wait_until,
)

from labels.client import ServiceError, TeacherClient
from labels.namespace import RecordFormat
from labels.store import open_existing
from labels.teacher import Teacher, TeacherSettings
from shards import Manifest, SkipCounter, augment, decode_image, iter_shard

TOKEN = "s3cret"


def some_samples(shards_dir, n=8, split="train"):
    m = Manifest.load(shards_dir)
    out = []
    for s in m.shards(split):
        for raw in iter_shard(shards_dir / s.name, SkipCounter()):
            out.append(raw)
            if len(out) == n:
                return out
    return out


@pytest.fixture(scope="module")
def service(demo_shards, tiny_teacher, tmp_path_factory):
    d = tmp_path_factory.mktemp("svc")
    env = dict(
        DISTILL_TOKEN=TOKEN,
        DISTILL_MAX_QUEUE_SIZE="64",
        DISTILL_MAX_ITEMS="300",
        DISTILL_MAX_UPLOAD_BYTES="200000",
        DISTILL_MAX_UPLOAD_WORK="100000",  # pixels x seeds: 16x16 x 300 fits, 400x400 x 1 does not
        DISTILL_AUGMENT_WORKERS="2",
    )
    proc, url = start_service(
        tiny_teacher, demo_shards, d / "labels.db", d / "service.log", "--max-batch-size", "16", env=env
    )
    client = TeacherClient(url, token=TOKEN, retry_for=3)
    yield {"url": url, "client": client, "store": str(d / "labels.db"), "proc": proc}
    family = descendants(proc.pid)
    private = engines_directory([proc.pid, *family])
    proc.send_signal(signal.SIGTERM)
    assert wait_exit(proc, "serve drains and stops on SIGTERM", 3) == -signal.SIGTERM
    assert "label engine stopped" not in (d / "service.log").read_text()  # drained, nothing refused
    assert not still_running(family), "processes left after SIGTERM"
    assert not os.path.exists(private), f"private directory left after SIGTERM: {os.listdir(private)}"


def test_service_matches_direct_teacher(service, demo_shards, tiny_teacher):
    samples = some_samples(demo_shards, 6)
    keys = [r.key for r in samples for _ in range(2)]
    seeds = [s for _ in samples for s in (3, 4)]
    batch, errors = service["client"].label(keys, seeds)
    assert batch.present.all() and errors == [None] * len(keys)
    teacher = Teacher(TeacherSettings(checkpoint=str(tiny_teacher)), device="cpu")
    policy = Manifest.load(demo_shards).policy()
    x = torch.stack([augment(decode_image(r.data), r.key, s, policy) for r in samples for s in (3, 4)])
    direct = teacher.logits(x).argmax(-1).numpy()
    assert (batch.top1 == direct).all()
    again = service["client"].lookup(keys, seeds)  # now cached
    assert (again.top1 == direct).all()
    info = service["client"].info()
    assert info["teacher_id"] == teacher.teacher_id and info["policy_id"] == policy.policy_id


def test_precompute_service_and_teacher_agree(service, demo_shards, tiny_teacher, tmp_path):
    store = tmp_path / "pre.db"
    summary = last_json(run_precompute(demo_shards, "7:9", store, tiny_teacher).stdout)
    assert summary["labels_computed"] == 1437 * 2
    phases = summary["startup_s"]  # start-up reported by phase, apart from the steady rate
    assert set(phases) == {"model", "store", "fingerprint", "index", "spawn", "verify", "first_label"}
    assert phases["first_label"] >= phases["spawn"] > 0 and summary["steady_labels_per_s"] > 0
    info = service["client"].info()
    assert summary["namespace"] == info["namespace"]
    assert info["fingerprint"]["sha256"] == summary["fingerprint"]  # the service and precompute render alike
    samples = some_samples(demo_shards, 10)
    keys = [r.key for r in samples]
    with open_existing(str(store)) as st:
        pre = st.get(keys, [8] * len(keys))
    svc, _ = service["client"].label(keys, [8] * len(keys))
    assert pre.present.all() and (pre.top1 == svc.top1).all()


BAD = [
    ("bad json", dict(content=b"{not json", headers={"content-type": "application/json"}), 422),
    ("wrong types", dict(json={"keys": "abc", "seeds": [1]}), 422),
    ("string seed", dict(json={"keys": ["a"], "seeds": ["1"]}), 422),
    ("negative seed", dict(json={"keys": ["a"], "seeds": [-1]}), 422),
    ("huge seed", dict(json={"keys": ["a"], "seeds": [2**40]}), 422),
    ("length mismatch", dict(json={"keys": ["a", "b"], "seeds": [1]}), 422),
    ("extra field", dict(json={"keys": ["a"], "seeds": [1], "x": 1}), 422),
    ("too many items", dict(json={"keys": ["a"] * 301, "seeds": [1] * 301}), 413),
    ("unknown key", dict(json={"keys": ["no/such/key"], "seeds": [1]}), 404),
    ("body too large", dict(content=b"x" * (17 * 1024 * 1024), headers={"content-type": "application/json"}), 413),
    # a chunked body declares no length: cut off at the limit
    (
        "chunked too large",
        dict(content=iter([b"x" * 1024 * 1024] * 17), headers={"content-type": "application/json"}),
        413,
    ),
    (
        "not UTF-8",
        dict(content=b'{"keys": ["\xff\xfe"], "seeds": [1]}', headers={"content-type": "application/json"}),
        422,
    ),
    (
        "nested too deep",
        dict(content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"}),
        422,
    ),
    ("seed past the namespace's range", dict(json={"keys": ["a"], "seeds": [5000]}), 422),
]


def test_a_json_body_larger_than_its_items_can_be_is_refused_before_parsing(service):
    """Reliability case 7: JSON bodies are parsed on the event loop, so the limit for them is what
    `max_items` items can take (here 300 x 560 B + 64 KiB), declared or streamed, checked before
    a byte is parsed; it was the 16 MB upload limit, and 1.6M items were parsed before the 413."""
    h = {"Authorization": f"Bearer {TOKEN}"}
    body = {"keys": ["k" * 500] * 1000, "seeds": [1] * 1000}  # 0.5 MB of valid JSON
    for kw in (
        dict(json=body),
        dict(content=iter([json.dumps(body).encode()]), headers={**h, "content-type": "application/json"}),
    ):
        r = httpx.post(service["url"] + "/v1/labels", headers=kw.pop("headers", h), timeout=30, **kw)
        assert r.status_code == 413 and r.json()["error"] == f"request body larger than {300 * 560 + 65536} bytes"


@pytest.mark.parametrize("name,kw,code", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_4xx_and_service_stays_up(service, name, kw, code):
    h = {"Authorization": f"Bearer {TOKEN}", **kw.pop("headers", {})}
    r = httpx.post(service["url"] + "/v1/labels", headers=h, timeout=30, **kw)
    assert r.status_code == code, r.text
    assert "error" in r.json()
    assert httpx.get(service["url"] + "/healthz").json() == {"status": "ok"}


def _png(size=(32, 32)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_uploads(service):
    h = {"Authorization": f"Bearer {TOKEN}"}
    url = service["url"] + "/v1/labels/upload"
    ok = httpx.post(url, headers=h, files={"image": ("a.png", _png())}, data={"seeds": "0,1"})
    assert ok.status_code == 200 and len(ok.json()["labels"]) == 2 and None not in ok.json()["labels"]
    assert ok.json()["key"].startswith("upload/")
    key, batch = service["client"].label_image(_png(), [1, 2])
    assert key == ok.json()["key"] and batch.top1[0] == ok.json()["labels"][1]
    cases = [
        ({"image": ("e.png", b"")}, {"seeds": "0"}, 400),
        ({"image": ("g.png", b"garbage bytes")}, {"seeds": "0"}, 400),
        ({"image": ("s.png", _png((16, 16)))}, {"seeds": "0"}, 400),  # under the 32 px crop padded by 4
        ({"image": ("big.png", b"\x89PNG" + os.urandom(250_000))}, {"seeds": "0"}, 413),
        ({"image": ("a.png", _png())}, {"seeds": "-3"}, 422),
        ({"image": ("a.png", _png())}, {"seeds": "x"}, 422),
        ({"image": ("a.png", _png())}, {"seeds": "1_0"}, 422),  # int() would take it
        ({"image": ("a.png", _png())}, {"seeds": "\u0661"}, 422),  # ARABIC-INDIC DIGIT ONE, int() too
        ({"image": ("a.png", _png())}, {"seeds": "4096"}, 422),  # past the namespace's seed range
        ({}, {"seeds": "1"}, 422),
    ]
    for files, data, code in cases:
        r = httpx.post(url, headers=h, files=files or None, data=data)
        assert r.status_code == code, (data, r.text)
        assert "error" in r.json()
        if files and files["image"][0] == "s.png":
            assert "smaller than the 32 px crop" in r.json()["error"], r.text
    # a decompression bomb: tiny PNG, huge canvas
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")
    r = httpx.post(url, headers=h, files={"image": ("bomb.png", buf.getvalue())}, data={"seeds": "0"})
    assert r.status_code == 400 and "too large" in r.json()["error"]
    # 100 MP: between Pillow's limit (64 MP here) and twice it, where Pillow only warns and decodes
    buf = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buf, format="PNG")
    r = httpx.post(url, headers=h, files={"image": ("bomb.png", buf.getvalue())}, data={"seeds": "0"})
    assert r.status_code == 400 and "too large" in r.json()["error"]
    # reliability case 3: a 631-byte JPEG whose header claims 8000x8000 is refused from its header
    # (it used to cost a 192 MB canvas and 4 s); an upload's pixels x seeds are bounded
    buf = io.BytesIO()
    Image.new("RGB", (8000, 8000)).save(buf, format="JPEG", quality=10)
    forged = buf.getvalue()[:631]
    r = httpx.post(url, headers=h, files={"image": ("f.jpg", forged)}, data={"seeds": "0"})
    assert r.status_code == 400 and "cannot hold the 8000x8000 pixels" in r.json()["error"]
    costly = _png((400, 400))
    r = httpx.post(url, headers=h, files={"image": ("c.png", costly)}, data={"seeds": "0"})
    assert r.status_code == 413 and "max_upload_work" in r.json()["error"]
    garbage = httpx.post(url, headers=h, files={"image": ("g.png", b"garbage bytes")}, data={"seeds": "0"})
    assert "0x" not in garbage.json()["error"]  # no heap address from Pillow's message
    assert httpx.get(service["url"] + "/healthz").status_code == 200


def test_unknown_routes_and_the_openapi_contract(service):
    r = httpx.get(service["url"] + "/v2/nothing")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    assert httpx.get(service["url"] + "/docs").status_code == 404  # no page that loads assets from a CDN
    spec = httpx.get(service["url"] + "/openapi.json").json()
    labels = spec["paths"]["/v1/labels"]["post"]["responses"]
    assert {"200", "401", "404", "413", "422", "503"} <= set(labels)
    assert labels["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")
    assert "Retry-After" in labels["503"]["headers"]
    assert "400" in spec["paths"]["/v1/labels/upload"]["post"]["responses"]


def test_token_required(service):
    body = {"keys": ["a"], "seeds": [0]}
    assert httpx.post(service["url"] + "/v1/labels/lookup", json=body).status_code == 401
    r = httpx.post(service["url"] + "/v1/labels/lookup", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "token" in r.json()["error"]
    assert httpx.get(service["url"] + "/healthz").status_code == 200  # health is open


def test_more_misses_than_the_queue_holds_is_413_not_a_retry(service, demo_shards):
    """Reliability case 4: 100 misses against a queue of 64 could never be accepted: 413 naming
    the limit (a 503 + Retry-After made a client that honours it loop forever), for labels and
    for an upload's seeds alike."""
    samples = some_samples(demo_shards, 100)
    keys = [r.key for r in samples]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(service["url"] + "/v1/labels", json={"keys": keys, "seeds": [77] * 100}, headers=auth)
    assert r.status_code == 413 and "queue of 64 items" in r.json()["error"] and "retry-after" not in r.headers
    with pytest.raises(ServiceError, match="413"):
        service["client"].label(keys, [77] * 100)
    files = {"image": ("x.png", _png((17, 17)), "image/png")}  # an image no other test labeled
    seeds = ",".join(str(s) for s in range(65))
    r = httpx.post(service["url"] + "/v1/labels/upload", files=files, data={"seeds": seeds}, headers=auth)
    assert r.status_code == 413 and "queue of 64 items" in r.json()["error"]
    # within the queue's capacity the same work goes through
    batch, _ = service["client"].label(keys[:50], [77] * 50)
    assert batch.present.all()
    metrics = httpx.get(service["url"] + "/metrics").text
    assert "distill_batch_size_bucket" in metrics


def test_concurrent_clients_are_batched(service, demo_shards):
    from concurrent.futures import ThreadPoolExecutor

    samples = some_samples(demo_shards, 48)

    def batches() -> tuple[float, float]:
        """(teacher batches, items in them) so far: the service is shared by this module's tests."""
        counts = {
            line.split("{")[0]: float(line.split()[-1])
            for line in httpx.get(service["url"] + "/metrics").text.splitlines()
            if line.startswith("distill_batch_size_")
        }
        return counts.get("distill_batch_size_count", 0.0), counts.get("distill_batch_size_sum", 0.0)

    def one(i):
        with TeacherClient(service["url"], token=TOKEN) as c:
            return c.label([samples[i].key], [200 + i])[0].present.all()

    before = batches()
    with ThreadPoolExecutor(16) as ex:
        assert all(ex.map(one, range(48)))
    after = batches()
    n_batches, n_items = after[0] - before[0], after[1] - before[1]
    assert n_items == 48  # this test's 48 one-item requests, and nothing else
    assert n_batches < n_items  # so some batch held more than one request's item


def test_requests_are_counted_by_route_and_outcome(service, demo_shards):
    """Every request's latency and its success or failure (by status code) are in /metrics, under
    its route's path; a request for no route under "unmatched"."""

    def counted() -> dict[str, float]:
        return {
            line.rsplit(" ", 1)[0]: float(line.split()[-1])
            for line in httpx.get(service["url"] + "/metrics").text.splitlines()
            if line.startswith(("distill_request_success_total", "distill_request_failure_total"))
            or line.startswith("distill_request_duration_seconds_count")
        }

    key = some_samples(demo_shards, 1)[0].key
    auth = {"Authorization": f"Bearer {TOKEN}"}
    before = counted()
    for _ in range(3):
        assert service["client"].lookup([key], [0]).present.shape == (1,)
    assert httpx.post(service["url"] + "/v1/labels/lookup", json={"keys": [key]}, headers=auth).status_code == 422
    assert httpx.post(service["url"] + "/v1/labels/lookup", json={"keys": [key], "seeds": [0]}).status_code == 401
    assert httpx.get(service["url"] + "/v2/nothing").status_code == 404
    after = counted()
    grew = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    lookup = 'endpoint="/v1/labels/lookup"'
    assert grew == {
        f"distill_request_success_total{{{lookup}}}": 3,
        f'distill_request_failure_total{{code="422",{lookup}}}': 1,
        f'distill_request_failure_total{{code="401",{lookup}}}': 1,
        'distill_request_failure_total{code="404",endpoint="unmatched"}': 1,
        f"distill_request_duration_seconds_count{{{lookup}}}": 5,
        'distill_request_duration_seconds_count{endpoint="unmatched"}': 1,
        'distill_request_success_total{endpoint="/metrics"}': 1,  # the first read of them
        'distill_request_duration_seconds_count{endpoint="/metrics"}': 1,
    }, grew


def test_client_retries_then_reports_unreachable():
    c = TeacherClient(f"http://127.0.0.1:{free_port()}", retry_for=2, backoff=0.01)
    t0 = time.time()
    with pytest.raises(ServiceError, match="retried for 2s"):
        c.lookup(["a"], [0])
    assert time.time() - t0 < 10


def test_precompute_sigkill_and_resume(demo_shards, tiny_teacher, tmp_path):
    store = tmp_path / "labels.db"
    argv = precompute_argv(demo_shards, "0:6", store, tiny_teacher, "--batch-size", "64")
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def some_stored() -> bool:  # some, not all, labels
        assert p.poll() is None, "precompute ended before it was killed"
        try:
            with open_existing(str(store)) as st:
                return st.num_keys() > 300
        except Exception:  # not created yet, or its namespace not yet written
            return False

    try:
        wait_until("precompute: 300 images stored", 8, some_stored, interval=0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with open_existing(str(store)) as st:
        before = sum(int(st.codec.present_mask(r).sum()) for rows in st.iter_rows() for _, r in rows)
    assert 0 < before < 1437 * 6
    summary = last_json(run_precompute(demo_shards, "0:6", store, tiny_teacher, "--batch-size", "64").stdout)
    assert summary["labels_present"] == before
    assert summary["labels_present"] + summary["labels_computed"] == 1437 * 6
    assert summary["labels_computed"] <= 1437 * 6 - before
    full = tmp_path / "full.db"
    run_precompute(demo_shards, "0:6", full, tiny_teacher, "--batch-size", "64")
    m = Manifest.load(demo_shards)
    keys = [r.key for s in m.shards("train") for r in iter_shard(demo_shards / s.name, SkipCounter())]
    with open_existing(str(store)) as a, open_existing(str(full)) as b:
        for seed in range(6):
            ga, gb = a.get(keys, [seed] * len(keys)), b.get(keys, [seed] * len(keys))
            assert ga.present.all() and gb.present.all()
            assert (ga.top1 == gb.top1).all()


@pytest.mark.learning
def test_precompute_on_two_devices_labels_what_one_device_does(demo_shards, tiny_teacher, tmp_path):
    """--devices: one engine per device in one job (two CPU engines here), with the torch renderer:
    both engines take work, and the labels are the one-engine job's, in the torch namespace."""
    two, one = tmp_path / "two.db", tmp_path / "one.db"
    flags = ("--renderer", "torch", "--workers", "1", "--batch-size", "64")
    s2 = last_json(run_precompute(demo_shards, "0:1", two, tiny_teacher, *flags, "--devices", "cpu,cpu").stdout)
    s1 = last_json(run_precompute(demo_shards, "0:1", one, tiny_teacher, *flags).stdout)
    assert s2["devices"] == ["cpu", "cpu"] and s1["devices"] == ["cpu"]
    assert sum(s2["labels_per_device"]) == s2["labels_computed"] == 1437 and min(s2["labels_per_device"]) > 0
    assert s2["policy_id"] == s1["policy_id"] == Manifest.load(demo_shards).policy("torch").policy_id
    m = Manifest.load(demo_shards)
    keys = [r.key for s in m.shards("train") for r in iter_shard(demo_shards / s.name, SkipCounter())]
    with open_existing(str(two)) as a, open_existing(str(one)) as b:
        ga, gb = a.get(keys, [0] * len(keys)), b.get(keys, [0] * len(keys))
    assert ga.present.all()
    learned(
        "labels of two engines = one engine's (batch composition may flip a tie)",
        (ga.top1 == gb.top1).mean(),
        above=0.99,
    )


def test_precompute_splits_nodes_without_overlap(demo_shards, tiny_teacher, tmp_path):
    store = str(tmp_path / "labels.db")
    totals = []
    for rank in range(2):
        extra = ("--node-rank", rank, "--num-nodes", "2", "--format", "top3p")
        s = last_json(run_precompute(demo_shards, "0:1", store, tiny_teacher, *extra).stdout)
        totals.append(s["labels_computed"])
        assert s["labels_present"] == 0  # the other node's shards are not this node's
    assert sum(totals) == 1437
    with open_existing(store) as st:
        assert st.namespace.format == RecordFormat(3, True)
        assert st.num_keys() == 1437


@pytest.mark.slow
def test_trainer_with_labels_service_on_an_empty_store(service, demo_shards, tmp_path):
    """`--labels service` with nothing precomputed: every label comes from the miss path (two ranks
    of 64 items against a queue of 64, so one waits on 503 + Retry-After), and ends up stored."""
    from test_trainer import student_args, torchrun

    def misses() -> float:
        text = httpx.get(service["url"] + "/metrics").text
        return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith("distill_cache_misses_total"))

    before = misses()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    s = last_json(
        torchrun(
            *student_args(
                demo_shards,
                tmp_path / "svc",
                "--labels",
                "service",
                "--service-url",
                service["url"],
                "--service-token-file",
                token_file,
                "--epochs",
                "1",
                "--max-steps",
                "3",
                "--eval-every",
                "0",
                "--no-export",
                "--seed",
                "11",
            )
        ).stdout
    )
    assert s["steps"] == 3 and s["labels_cached"] == 3 * 64 * 2 and s["labels_missing"] == 0
    # every label trained on was computed by the teacher (the loader prefetches a few batches more)
    computed = misses() - before
    assert computed >= 3 * 64 * 2 and computed % 64 == 0


def test_precompute_refuses_a_modified_shard_and_shards_without_an_index(demo_shards, tiny_teacher, tmp_path):
    """A shard that does not match its checksum is refused whole; with the check off, the member
    index still reads each image at its offset, past the damaged tar header; shards built before
    indexes are refused with the command that writes one."""
    shards = copy_shards(demo_shards, tmp_path / "shards")
    m = Manifest.load(shards)
    victim = shards / m.shards("train")[0].name
    flip_tar_header_bit(victim, 20)  # a member header in the middle of the shard
    # checked against the manifest first: the shard is refused whole, the run says it is not complete
    r = run_precompute(shards, "0:2", tmp_path / "l.db", tiny_teacher, check=False)
    s = last_json(r.stdout)
    assert r.returncode == 1 and not s["ok"] and s["shards_damaged"] == [victim.name]
    assert "modified" in r.stderr and s["labels_skipped"] == m.shards("train")[0].samples * 2
    assert s["labels_present"] + s["labels_computed"] + s["labels_skipped"] == 1437 * 2
    # without the check: through the index every image is read at its offset, the header unread
    s = last_json(run_precompute(shards, "0:2", tmp_path / "l2.db", tiny_teacher, "--no-verify").stdout)
    assert s["ok"] and s["labels_computed"] == 1437 * 2 and s["labels_skipped"] == 0
    legacy = copy_shards(demo_shards, tmp_path / "legacy", index=False)
    r = run_precompute(legacy, "0:2", tmp_path / "l3.db", tiny_teacher, check=False)
    assert r.returncode == 2 and f"`python -m shards index {legacy}`" in r.stderr, r.stderr[-500:]
