"""The label engine in-process (precompute's layout) and the service's labeling logic without uvicorn."""

import asyncio
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, Budget, descendants, engines_directory, start_service, still_running, wait_exit, wait_until

from labels.client import TeacherClient
from labels.namespace import RecordFormat
from labels.store import open_store
from labels.teacher import Teacher, TeacherSettings
from shards import Manifest, augment, decode_image
from shards.index import ShardIndex, SplitIndex
from teacher_service.app.labeling import LabelService
from teacher_service.engine.client import EngineRouter, LocalEngine
from teacher_service.engine.contract import EngineConfig, EngineError, Job, QueueFull, RequestTooLarge, Result
from teacher_service.engine.core import LabelEngine
from teacher_service.metrics import Metrics


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return Teacher(TeacherSettings(checkpoint=str(tiny_teacher)), device="cpu")


@pytest.fixture(scope="module")
def members(demo_shards):
    index = SplitIndex.load(demo_shards, "train")
    return [km for s in range(2) for km in index.members(s)]


def make_engine(teacher, demo_shards, tmp_path, fmt=RecordFormat(), renderer=None, **config):
    policy = Manifest.load(demo_shards).policy(renderer)
    ns = teacher.namespace(policy.policy_id, fmt, Manifest.load(demo_shards).classes)
    store = str(tmp_path / "labels.db")
    open_store(store, ns).close()
    cfg = EngineConfig(**{"max_batch_size": 8, "max_queue_delay_ms": 2.0, "workers": 2, **config})
    return LabelEngine(teacher, policy, fmt, cfg, store, ns, Metrics()), store, ns, policy


def wait_result(engine, jobs, measured_s: float = 2.0) -> Result:
    got, done = [], threading.Event()
    engine.submit(jobs, lambda r: (got.append(r), done.set()))
    clock = Budget(f"engine: answer to {len(jobs)} jobs", measured_s)
    if not done.wait(clock.seconds):
        clock.fail()
    clock.done()
    if isinstance(got[0], BaseException):
        raise got[0]
    return got[0]


def test_engine_matches_the_teacher_and_stores_before_answering(teacher, members, demo_shards, tmp_path):
    engine, store, ns, policy = make_engine(teacher, demo_shards, tmp_path, fmt=RecordFormat(3, True))
    # 3 images x 5 seeds = 15 items over batches of 8: an image's seeds cross a batch boundary
    jobs = [Job(member, key, (0, 1, 2, 3, 4)) for key, member in members[:3]]
    with engine:
        res = wait_result(engine, jobs)
        assert res.stored and res.errors == [None] * 15
        x = torch.stack([augment(decode_image(m.read()), k, s, policy) for k, m in members[:3] for s in range(5)])
        probs = teacher.logits(x).softmax(-1)
        p, c = probs.topk(3)
        assert (torch.from_numpy(res.classes) == c).all()
        torch.testing.assert_close(torch.from_numpy(res.probs), p, rtol=1e-4, atol=1e-5)
        with open_store(store, ns) as st:  # already stored when answered
            got = st.get([k for k, _ in members[:3] for _ in range(5)], [s for _ in range(3) for s in range(5)])
        assert got.present.all() and (torch.from_numpy(got.classes) == c).all()
        assert engine.depth == 0
        fills = engine.metrics.registry.get_sample_value("distill_batch_size_sum", {"device": "cpu"})
        assert fills == 15


@pytest.mark.parametrize("render", ["workers", "device"])
def test_torch_renderer_crops_are_the_same_rendered_in_workers_or_on_the_device(
    teacher, members, demo_shards, tmp_path, render
):
    """ "device" is the CUDA layout (workers decode and draw, the teacher's device renders the
    batch), run here on the CPU: the labels are the teacher's on the crops `augment` gives."""
    engine, _, _, policy = make_engine(
        teacher, demo_shards, tmp_path, renderer="torch", render=render, max_batch_size=16
    )
    assert policy.renderer == "torch" and engine.render_on_device == (render == "device")
    jobs = [Job(member, key, (0, 1, 2, 3)) for key, member in members[:4]] + [Job(b"not an image", "bad", (0,))]
    with engine:
        res = wait_result(engine, jobs)
    assert res.errors[:16] == [None] * 16 and "bad" in res.errors[16]
    x = torch.stack([augment(decode_image(m.read()), k, s, policy) for k, m in members[:4] for s in range(4)])
    c = teacher.logits(x).argmax(-1)
    assert (torch.from_numpy(res.classes[:16, 0]) == c).all()


@pytest.mark.parametrize("render", ["workers", "device"])
def test_a_compiled_teacher_sees_one_batch_shape(members, demo_shards, tiny_teacher, tmp_path, monkeypatch, render):
    """With a compiled teacher every batch is padded to max_batch_size: torch.compile (Teacher.compile,
    with a backend that records the shapes it compiles for) compiles one graph, for one shape, and
    never recompiles; the padding's labels are never answered."""
    import torch._dynamo

    compiled_for = []

    def recording_backend(gm, example_inputs):
        images = [t for t in example_inputs if isinstance(t, torch.Tensor) and tuple(t.shape[1:]) == (3, 32, 32)]
        compiled_for.append(tuple(tuple(t.shape) for t in images))
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend=recording_backend, dynamic=False))
    torch._dynamo.reset()
    teacher = Teacher(TeacherSettings(checkpoint=str(tiny_teacher)), device="cpu").compile()
    engine, _, _, policy = make_engine(teacher, demo_shards, tmp_path, renderer="torch", render=render)
    jobs = [Job(member, key, (0, 1, 2)) for key, member in members[:3]]  # 9 crops: a full batch, then 1
    with engine:
        res = wait_result(engine, jobs, measured_s=30)
    assert compiled_for == [((8, 3, 32, 32),)], compiled_for  # one graph, for the padded shape only
    plain = Teacher(TeacherSettings(checkpoint=str(tiny_teacher)), device="cpu")
    x = torch.stack([augment(decode_image(m.read()), k, s, policy) for k, m in members[:3] for s in range(3)])
    assert (torch.from_numpy(res.classes[:, 0]) == plain.logits(x).argmax(-1)).all() and res.errors == [None] * 9


@pytest.mark.unit
def test_a_short_batch_is_padded_on_the_teachers_device_into_a_kept_buffer():
    """The padding of a compiled teacher's short batch is made on the teacher's device, in a buffer
    kept across batches (a `torch.cat` on the host made ~150 MB of copies a batch at 224 px). The
    meta device stands in for a GPU; the crops come from the host, as the workers' buffers do."""
    from types import SimpleNamespace

    engine = LabelEngine.__new__(LabelEngine)
    engine.teacher = SimpleNamespace(compiled=True, device=torch.device("meta"))
    engine.config = SimpleNamespace(max_batch_size=8)
    engine._render_stream, engine._pad_buffer = None, None
    host = torch.ones(8, 3, 32, 32)
    engine._pixels = lambda b: host[: b.n]
    first = engine._rendered(SimpleNamespace(n=3))
    second = engine._rendered(SimpleNamespace(n=5))
    assert first.device.type == "meta" and tuple(first.shape) == (8, 3, 32, 32)
    assert second is first  # the kept buffer: no allocation, no host tensor a batch


@pytest.mark.parametrize("thread", ["scheduler", "augmentation callback", "inference", "writer"])
def test_an_exception_in_any_engine_thread_fails_the_engine_loudly(teacher, members, demo_shards, tmp_path, thread):
    """Whatever an engine thread raises, every waiting request gets an EngineError naming it and
    new work is refused: before, the inference thread died on a teacher result it could not read
    (`classes.numpy()` outside its `try`) and every request waited forever."""
    from labels.teacher import PendingPrediction

    engine, _, _, _ = make_engine(teacher, demo_shards, tmp_path)

    def broken(*args, **kwargs):
        raise OSError(f"injected into the {thread} thread")

    if thread == "inference":  # the teacher answers with something that is not tensors
        engine.teacher = type("T", (), {"launch": lambda self, x, k: PendingPrediction(None, None, None),
                                       "device": teacher.device, "compiled": False})()  # fmt: skip
    elif thread == "scheduler":
        engine._batcher.fill = broken
    elif thread == "augmentation callback":  # on the pool's thread, which swallows what callbacks raise
        engine._batcher.owner = type("Owner", (dict,), {"__getitem__": broken})()
    else:
        engine._store_and_answer = broken
    why = "injected" if thread != "inference" else "teacher failed"
    with engine:
        with pytest.raises(EngineError, match=why):
            wait_result(engine, [Job(m, k, (0, 1)) for k, m in members[:2]], measured_s=1)
        with pytest.raises(EngineError, match=why):  # and it takes no new work
            engine.submit([Job(members[0][1], members[0][0], (5,))], lambda r: None)


def test_workers_that_prepare_for_the_device_import_no_timm(demo_shards, tmp_path):
    """A worker that cuts crops for the device (or leaves JPEGs encoded) builds no timm transform:
    in its own process, after a task, timm is not even imported; it wrote the task's uint8 crops."""
    import json
    import subprocess
    import sys

    policy = Manifest.load(demo_shards).policy("torch").to_json()
    code = f"""
import json, sys, torch
from shards.index import SplitIndex
from teacher_service.engine import worker
index = SplitIndex.load({str(demo_shards)!r}, "train")
entries = [(index.member(r), index.key(r), [(0, 2 * r), (1, 2 * r + 1)]) for r in range(4)]
buffers = [torch.zeros((8, 3, 32, 32), dtype=torch.uint8)]
worker.init(buffers, {policy!r}, "cut", None)
bid, errors, prepared = worker.run((0, entries))
print(json.dumps({{"timm": "timm" in sys.modules, "prepared": sorted(prepared), "errors": errors,
                  "written": int((buffers[0].flatten(1) > 0).any(1).sum())}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"timm": False, "prepared": list(range(8)), "errors": {}, "written": 8}, out.stderr[-2000:]


def test_an_augment_task_writes_each_crop_in_its_slot_and_fails_only_a_bad_images(demo_shards):
    """A worker decodes a task's images first, then makes their crops: each slot still gets its own
    (key, seed)'s crop, bit for bit `augment`'s, and an undecodable image fails its slots alone."""
    import json
    import subprocess
    import sys

    policy = Manifest.load(demo_shards).policy().to_json()
    code = f"""
import json, torch
from shards import AugmentPolicy, augment, decode_image
from shards.index import SplitIndex
from teacher_service.engine import worker
index = SplitIndex.load({str(demo_shards)!r}, "train")
policy = AugmentPolicy.from_json({policy!r})
entries = [(index.member(r), index.key(r), [(3, 2 * r), (r, 2 * r + 1)]) for r in range(3)]
entries.insert(1, (b"not an image", "bad", [(0, 6), (1, 7)]))
buffers = [torch.zeros((8, 3, policy.input_size, policy.input_size))]
worker.init(buffers, {policy!r}, "augment", None)
bid, errors, prepared = worker.run((0, entries))
same = [bool(torch.equal(buffers[0][slot], augment(decode_image(source.read()), key, seed, policy)))
        for source, key, pairs in entries if key != "bad" for seed, slot in pairs]
print(json.dumps({{"errors": errors, "same": same}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["same"] == [True] * 6, out.stderr[-2000:]
    assert sorted(got["errors"]) == ["6", "7"] and all(e.startswith("bad: ") for e in got["errors"].values())


def test_engine_refuses_a_full_queue_before_any_work(teacher, members, demo_shards, tmp_path):
    """A full queue refuses work before any of it starts, with a short Retry-After right after
    start (reliability case 5: no rate measured yet); work larger than the whole queue is refused
    as such (case 4: it could never fit, so no Retry-After would help)."""
    engine, store, ns, _ = make_engine(
        teacher, demo_shards, tmp_path, max_queue_size=10, max_batch_size=64, max_queue_delay_ms=1500
    )
    with engine:
        with pytest.raises(RequestTooLarge, match="queue of 10 items"):
            engine.submit([Job(m, k, tuple(range(11))) for k, m in members[:1]], lambda r: None)
        assert engine.depth == 0
        done = threading.Event()
        engine.submit([Job(m, k, (0,)) for k, m in members[:6]], lambda r: done.set())  # the batch waits 1.5 s
        with pytest.raises(QueueFull) as e:
            engine.submit([Job(m, k, (1,)) for k, m in members[:5]], lambda r: None)
        assert e.value.retry_after == 1 and engine.depth == 6  # 6 queued items drain in well under 1 s
        sample = engine.metrics.registry.get_sample_value
        assert sample("distill_inference_count_total", {"device": "cpu"}) in (None, 0.0)
        assert sample("distill_queue_rejected_total", {"device": "cpu"}) == 5
        res = wait_result(engine, [Job(m, k, (2,)) for k, m in members[:4]], measured_s=2.0)  # 4 more fit
        assert res.errors == [None] * 4 and done.is_set()


def test_engine_publishes_its_queue_depth_and_the_router_picks_the_shortest(teacher, members, demo_shards, tmp_path):
    """The depth every HTTP worker's router reads is the engine's whole queue (shared memory)."""
    engine, _, _, _ = make_engine(teacher, demo_shards, tmp_path, max_queue_delay_ms=10_000, max_batch_size=64)
    out = np.zeros(1, dtype=np.int64)
    with engine:
        engine.publish_depth(out)
        done = threading.Event()
        engine.submit([Job(m, k, (0, 1)) for k, m in members[:3]], lambda r: done.set())  # 6 of 64: the batch waits
        assert out[0] == 6 == engine.depth
    assert done.is_set() and out[0] == 0  # drained at close

    class Fake:
        alive, info = True, {}

        def __init__(self, name, depth, full=False):
            self.name, self.queue_depth, self.full = name, depth, full

        async def label(self, jobs):
            if self.full:
                raise QueueFull(f"{self.name} full", retry_after=2.0 if self.name == "a" else 1.0)
            return self.name

    route = lambda *engines: asyncio.run(EngineRouter(list(engines)).label([]))  # noqa: E731
    assert route(Fake("a", 50), Fake("b", 3)) == "b"
    assert route(Fake("a", 50), Fake("b", 3, full=True)) == "a"  # the shortest is full: the next
    with pytest.raises(QueueFull) as e:
        route(Fake("a", 0, full=True), Fake("b", 0, full=True))
    assert e.value.retry_after == 1.0  # the sooner of the two


def test_engine_per_item_errors_are_not_stored(teacher, members, demo_shards, tmp_path):
    engine, store, ns, _ = make_engine(teacher, demo_shards, tmp_path)
    (key, member) = members[0]
    with engine:
        res = wait_result(engine, [Job(b"not an image", "bad/key", (0, 1)), Job(member, key, (0,))])
    assert res.errors[0] == "bad/key: cannot identify the image format" and res.errors[1] == res.errors[0]
    assert res.errors[2] is None and res.classes[2, 0] >= 0
    with open_store(store, ns) as st:
        assert st.get(["bad/key", key], [0, 0]).present.tolist() == [False, True]


def test_engine_worker_death_fails_waiting_work_clearly(teacher, members, demo_shards, tmp_path):
    engine, _, _, _ = make_engine(teacher, demo_shards, tmp_path, max_queue_delay_ms=10_000, max_batch_size=64)
    with engine:
        outcome, done = [], threading.Event()
        engine.submit([Job(members[0][1], members[0][0], (0,))], lambda r: (outcome.append(r), done.set()))
        os.kill(engine.worker_pids[0], signal.SIGKILL)  # the batch waits 10 s for more items: still open
        wait_until("engine: fail the waiting work after a worker's death", 1.0, done.is_set, interval=0.05)
        assert isinstance(outcome[0], EngineError) and "died" in str(outcome[0])
        with pytest.raises(EngineError):
            engine.submit([Job(members[0][1], members[0][0], (1,))], lambda r: None)


def test_a_worker_killed_mid_batch_answers_every_request_once(teacher, members, demo_shards, tmp_path):
    """Eight requests in flight over full batches when a worker is killed: each one is answered
    exactly once, with its labels (done before the death) or an EngineError saying a worker died;
    none waits forever, none is answered twice, and the engine closes."""
    engine, _, _, _ = make_engine(teacher, demo_shards, tmp_path, max_batch_size=64, max_queue_delay_ms=1.0)
    answers: list[list] = [[] for _ in range(8)]
    all_done = threading.Semaphore(0)

    def answer(i):
        return lambda outcome: (answers[i].append(outcome), all_done.release())

    with engine:
        for i in range(8):  # 8 x 4 images x 8 seeds = 256 crops: four full batches
            engine.submit([Job(m, k, tuple(range(8))) for k, m in members[4 * i : 4 * i + 4]], answer(i))
        os.kill(engine.worker_pids[0], signal.SIGKILL)
        clock = Budget("engine: every request answered after a worker's death", 1.0)
        for _ in range(8):
            if not all_done.acquire(timeout=clock.seconds):
                clock.fail()
        clock.done()
        time.sleep(0.5)  # a second answer would come from a thread still running: give it time
    assert [len(a) for a in answers] == [1] * 8
    outcomes = [a[0] for a in answers]
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert failed, "the kill came after every request was answered: the test did not test the death"
    assert all(isinstance(o, EngineError) and "augmentation worker died" in str(o) for o in failed), failed
    assert all(o.errors == [None] * 32 and (o.classes[:, 0] >= 0).all() for o in outcomes if isinstance(o, Result))
    assert engine.failed is not None


def test_label_service_in_process(teacher, demo_shards, tmp_path):
    """The routes' logic without HTTP: hits from the store, misses through an engine, per-item errors."""
    engine, store, ns, _ = make_engine(teacher, demo_shards, tmp_path)
    index = ShardIndex.load(demo_shards, ["train"])
    keys = list(index.keys())[:6]

    async def scenario(svc):
        first = await svc.label(keys + ["no/such/key"], [0] * 7)
        again = await svc.lookup(keys, [0] * 6)
        return first, again

    with engine, open_store(store, ns) as st:
        svc = LabelService(
            st, LocalEngine(engine, Manifest.load(demo_shards).classes), index, ns, RecordFormat(), Metrics()
        )
        first, again = asyncio.run(scenario(svc))
    assert first.computed == 6 and first.cached == 0 and None not in first.labels[:6]
    assert first.errors[6] == "unknown key 'no/such/key'" and first.labels[6] is None
    assert again.cached == 6 and again.labels == first.labels[:6]


def test_a_request_computes_each_pair_once_and_uploads_stay_out_of_the_store(teacher, demo_shards, tmp_path):
    """4,096 identical (key, seed) items computed one crop (they computed 4,096); an upload of
    4,096 seeds, 1,024 distinct, computes 1,024; uploads are answered but never stored (any client
    could grow the store), remembered in a bounded cache of the HTTP worker instead."""
    import io

    from PIL import Image

    engine, store, ns, _ = make_engine(teacher, demo_shards, tmp_path, max_queue_size=4096, max_batch_size=64)
    index = ShardIndex.load(demo_shards, ["train"])
    key = next(iter(index.keys()))
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (90, 160, 30)).save(buf, format="PNG")
    seeds = [i % 1024 for i in range(4096)]

    def crops() -> int:
        return int(engine.metrics.registry.get_sample_value("distill_inference_count_total", {"device": "cpu"}) or 0)

    async def scenario(svc):
        same = await svc.label([key] * 4096, [3] * 4096)
        after_same = crops()
        upload_key, up = await svc.upload(buf.getvalue(), seeds)
        after_upload = crops()
        return same, after_same, upload_key, up, after_upload, (await svc.upload(buf.getvalue(), [0, 1023]))[1]

    with engine, open_store(store, ns) as st:
        classes = Manifest.load(demo_shards).classes
        svc = LabelService(st, LocalEngine(engine, classes), index, ns, RecordFormat(), Metrics(), upload_cache=512)
        same, after_same, upload_key, up, after_upload, again = asyncio.run(scenario(svc))
        assert after_same == 1 and same.computed == 1 and len(set(same.labels)) == 1 and None not in same.labels
        assert after_upload == 1 + 1024 and up.computed == 1024 and None not in up.labels
        assert [up.labels[i] for i in range(1024, 4096)] == [up.labels[i % 1024] for i in range(1024, 4096)]
        assert not st.get([upload_key] * 3, [0, 1, 2]).present.any()  # nothing of the upload in the store
        # the cache is bounded: the oldest seed (0) was forgotten and computed again, the newest was not
        assert len(svc._uploads) == 512 and (again.computed, again.cached) == (1, 1)


@pytest.mark.slow
def test_serve_two_engines_two_http_workers_and_no_orphans_after_kill9(demo_shards, tiny_teacher, tmp_path):
    proc, url = start_service(
        tiny_teacher,
        demo_shards,
        tmp_path / "labels.db",
        tmp_path / "serve.log",
        "--devices",
        "cpu,cpu",
        "--http-workers",
        "2",
        "--augment-workers",
        "1",
    )
    try:
        c = TeacherClient(url)
        assert c.info()["devices"] == ["cpu", "cpu"]
        keys = list(ShardIndex.load(demo_shards, ["train"]).keys())[:40]
        batch, errors = c.label(keys, [5] * 40)
        assert batch.present.all() and errors == [None] * 40
        family = descendants(proc.pid)
        assert len(family) >= 2 + 2 + 2  # 2 engines with a worker each, 2 HTTP workers (+ helpers)
        private = engines_directory(family)  # this service's, not another one's on the same machine
        assert os.path.isdir(private)
    finally:
        proc.kill()
        proc.wait()
    alive = still_running(family, "every process of serve exits after its kill -9", 3.0)
    assert not alive, f"processes left behind after kill -9 of the service: {alive}"
    # the engines remove what their killed supervisor cannot
    assert not os.path.exists(private), f"private directory left behind: {os.listdir(private)}"


@pytest.mark.slow
def test_serve_with_two_http_workers_stops_on_sigterm(demo_shards, tiny_teacher, tmp_path):
    """uvicorn's Multiprocess handles SIGTERM itself; the supervisor's handler passes it on (it
    replaced it: the service ignored SIGTERM until a kill -9)."""
    proc, _ = start_service(
        tiny_teacher, demo_shards, tmp_path / "labels.db", tmp_path / "serve.log", "--http-workers", "2",
        "--augment-workers", "1",
    )  # fmt: skip
    family = descendants(proc.pid)
    private = engines_directory(family)
    try:
        proc.terminate()
        assert wait_exit(proc, "serve with 2 HTTP workers exits on SIGTERM", 3.0) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not still_running(family, "serve's processes exit after SIGTERM")
    assert not os.path.exists(private)


@pytest.mark.slow
def test_serve_exits_1_when_its_engine_dies(demo_shards, tiny_teacher, tmp_path):
    proc, _ = start_service(
        tiny_teacher, demo_shards, tmp_path / "labels.db", tmp_path / "serve.log", "--augment-workers", "1"
    )
    try:
        family = descendants(proc.pid)
        engines = [p for p in family if descendants(p)]  # the engine is the child with children (its worker)
        assert len(engines) == 1
        os.kill(engines[0], signal.SIGKILL)
        assert wait_exit(proc, "serve exits after its engine's death", 2.0) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "label engine died" in (tmp_path / "serve.log").read_text()
    assert not still_running(family, "serve's processes exit after its engine's death")


@pytest.mark.parametrize(
    "module", ["teacher_service.engine.contract", "teacher_service.engine.messages", "teacher_service.engine"]
)
def test_the_engine_contract_loads_no_torch(module):
    """What talks to an engine (routes, clients, messages) needs its contract, not its
    implementation: importing the contract, in a fresh interpreter, loads no torch and no timm."""
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'timm', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"{module} loads {out.stdout.strip()}"
