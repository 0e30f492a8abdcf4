"""The label engine as a process of its own, one per device, and the async handles the HTTP side uses.

Why a process: the HTTP event loop, JSON work and the teacher's batch loop must not share one
interpreter and its GIL (the layout of Triton, TorchServe, LitServe and Ray Serve). An engine
process owns a LabelEngine and listens on a Unix socket (multiprocessing.connection, with an
authentication key); any number of HTTP worker processes connect to it. Messages are small
pickles: (key, tar member, seeds) work in, labels out; crops never cross this boundary.

    EnginePool.start()      the supervisor: one engine process per device, waits until all are ready
    RemoteEngine            an HTTP worker's connection to one engine: `await label(jobs)`
    LocalEngine             the same interface over an in-process LabelEngine (tests, embedding)
    EngineRouter            several engines: the one with the shortest queue takes the work, the next
                            if it is full

Each engine publishes its queue depth (items accepted, not yet answered, from every HTTP worker) in
a shared int64 beside its socket (`<socket>.depth`); the routers of all HTTP workers read it, so
"least loaded" means the engine's whole queue, not what one HTTP worker sent it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Client, Connection, Listener

import numpy as np
import torch.multiprocessing as mp

from .engine import EngineConfig, EngineError, Job, LabelEngine, QueueFull, Result
from .metrics import Metrics, enable_multiprocess, mark_process_dead
from .teacher import TeacherSettings

log = logging.getLogger(__name__)

ADDRESSES_ENV = "DISTILL_ENGINE_SOCKETS"  # set by `serve` for its HTTP workers; not a user setting
AUTHKEY_ENV = "DISTILL_ENGINE_AUTHKEY"


@dataclass
class EngineSpec:
    """Everything an engine process needs to build its teacher and engine."""

    teacher: TeacherSettings
    policy_json: str
    classes: list[str] | None  # from the manifest; None: the teacher's own
    format: str
    store_url: str
    config: EngineConfig
    device: str = "cpu"
    seed_limit: int | None = None


def engine_devices(devices: str) -> list[str]:
    """'auto': one engine per visible GPU, else one on the CPU; or a comma list (cuda:0,cuda:1)."""
    import torch

    if devices == "auto":
        n = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    out = [d.strip() for d in devices.split(",") if d.strip()]
    if not out:
        raise ValueError("--devices must name at least one device")
    return out


def _info(engine: LabelEngine, classes: list[str]) -> dict:
    t = engine.teacher
    return {
        "model": t.model_name,
        "teacher_id": t.teacher_id,
        "num_classes": t.num_classes,
        "classes": classes,
        "namespace": engine.namespace.meta(),
        "device": engine.device,
        "max_batch_size": engine.config.max_batch_size,
        "max_queue_size": engine.config.max_queue_size,
    }


def _engine_main(spec: EngineSpec, address: str, authkey: bytes, ready: Connection) -> None:
    """An engine process: teacher + LabelEngine + a Unix-socket server; exits when its engine fails,
    on SIGTERM (after draining briefly) or when its parent is gone."""
    from shards import AugmentPolicy

    from .engine import exit_with_parent
    from .namespace import RecordFormat
    from .store import open_store
    from .teacher import Teacher

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s engine[{spec.device}] %(message)s")
    # a supervisor killed with SIGKILL cannot remove its private directory (sockets, metrics): we do
    exit_with_parent(cleanup=lambda: shutil.rmtree(os.path.dirname(address), ignore_errors=True))
    try:
        if spec.device.startswith("cuda"):
            import torch

            torch.cuda.set_device(spec.device)  # streams and events of this process: its own GPU
        teacher = Teacher(spec.teacher, device=spec.device)
        policy = AugmentPolicy.from_json(spec.policy_json)
        fmt = RecordFormat.parse(spec.format)
        classes = spec.classes or teacher.classes
        namespace = teacher.namespace(policy.policy_id, fmt, classes)
        # create the namespace (and extend its seed range) now: fail early when the store is unreachable
        open_store(spec.store_url, namespace, seed_limit=spec.seed_limit).close()
        engine = LabelEngine(teacher, policy, fmt, spec.config, spec.store_url, namespace, Metrics()).start()
        engine.publish_depth(np.memmap(depth_path(address), dtype=np.int64, mode="w+", shape=(1,)))
        listener = Listener(address, family="AF_UNIX", authkey=authkey)
    except Exception as e:
        ready.send(("error", f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from e
    info = _info(engine, classes)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=_accept, args=(listener, engine, info), name="engine-accept", daemon=True).start()
    ready.send(("ready", info))
    ready.close()
    while not stop.wait(0.5):
        if engine.failed is not None:
            log.error("%s: engine process exits", engine.failed)
            os._exit(1)
    engine.close(drain=True, timeout=10)
    listener.close()


def depth_path(address: str) -> str:
    """Where the engine at `address` publishes its queue depth."""
    return address + ".depth"


def _accept(listener: Listener, engine: LabelEngine, info: dict) -> None:
    while True:
        try:
            conn = listener.accept()
        except OSError:  # closed at shutdown
            return
        except Exception as e:  # a peer without the key: refuse it, keep serving
            log.warning("refused an engine connection: %s", e)
            continue
        threading.Thread(target=_serve_connection, args=(conn, engine, info), name="engine-conn", daemon=True).start()


def _serve_connection(conn: Connection, engine: LabelEngine, info: dict) -> None:
    lock = threading.Lock()

    def send(msg) -> None:
        try:
            with lock:
                conn.send(msg)
        except OSError:  # the HTTP worker went away; its requests have no one to answer
            pass

    def answer(rid: int):
        def done(outcome: Result | BaseException) -> None:
            if isinstance(outcome, BaseException):
                send(("failed", rid, str(outcome)))
            else:
                send(("done", rid, outcome))

        return done

    send(("hello", 0, info))
    while True:
        try:
            kind, rid, jobs = conn.recv()
        except (EOFError, OSError):
            conn.close()
            return
        try:
            engine.submit(jobs, answer(rid))
        except QueueFull as e:
            send(("full", rid, (str(e), e.retry_after)))
        except EngineError as e:
            send(("failed", rid, str(e)))


class _AsyncAnswers:
    """Futures of one event loop per request id, resolved from another thread."""

    def __init__(self):
        self._ids = itertools.count()
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}

    def new(self) -> tuple[int, asyncio.Future]:
        loop = asyncio.get_running_loop()
        rid, fut = next(self._ids), loop.create_future()
        self._waiting[rid] = (loop, fut)
        return rid, fut

    def resolve(self, rid: int, value=None, error: BaseException | None = None) -> None:
        entry = self._waiting.pop(rid, None)
        if entry is not None:
            entry[0].call_soon_threadsafe(_set, entry[1], value, error)

    def discard(self, rid: int) -> None:
        self._waiting.pop(rid, None)

    def fail_all(self, error: BaseException) -> None:
        for rid in list(self._waiting):
            self.resolve(rid, error=error)


def _set(fut: asyncio.Future, value, error) -> None:
    if not fut.done():
        fut.set_exception(error) if error is not None else fut.set_result(value)


class RemoteEngine:
    """An HTTP worker's connection to one engine process."""

    def __init__(self, address: str, authkey: bytes):
        self.address = address
        self.conn = Client(address, family="AF_UNIX", authkey=authkey)
        kind, _, self.info = self.conn.recv()
        if kind != "hello":
            raise EngineError(f"engine at {address} answered {kind!r} instead of hello")
        self._depth = np.memmap(depth_path(address), dtype=np.int64, mode="r", shape=(1,))  # written before hello
        self.alive = True
        self._answers = _AsyncAnswers()
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read, name="engine-reader", daemon=True).start()

    async def label(self, jobs: list[Job]) -> Result:
        if not self.alive:
            raise EngineError(f"engine on {self.info['device']} is gone")
        rid, fut = self._answers.new()
        try:
            with self._send_lock:
                self.conn.send(("label", rid, jobs))
        except OSError as e:
            self._answers.discard(rid)
            raise EngineError(f"engine on {self.info['device']} is gone: {e}") from e
        return await fut

    @property
    def queue_depth(self) -> int:
        """The engine's queue: items accepted from every HTTP worker and not yet answered."""
        return int(self._depth[0])

    def _read(self) -> None:
        while True:
            try:
                kind, rid, payload = self.conn.recv()
            except (EOFError, OSError):
                self.alive = False
                self._answers.fail_all(EngineError(f"engine on {self.info['device']} is gone"))
                return
            if kind == "done":
                self._answers.resolve(rid, payload)
            elif kind == "full":
                self._answers.resolve(rid, error=QueueFull(*payload))
            else:
                self._answers.resolve(rid, error=EngineError(payload))

    def close(self) -> None:
        self.alive = False
        self.conn.close()


class LocalEngine:
    """RemoteEngine's interface over a LabelEngine in this process."""

    def __init__(self, engine: LabelEngine, classes: list[str]):
        self.engine = engine
        self.info = _info(engine, classes)
        self._answers = _AsyncAnswers()

    @property
    def queue_depth(self) -> int:
        return self.engine.depth

    @property
    def alive(self) -> bool:
        return self.engine.failed is None

    async def label(self, jobs: list[Job]) -> Result:
        rid, fut = self._answers.new()

        def done(outcome):
            if isinstance(outcome, BaseException):
                self._answers.resolve(rid, error=outcome)
            else:
                self._answers.resolve(rid, outcome)

        try:
            self.engine.submit(jobs, done)
        except BaseException:
            self._answers.discard(rid)
            raise
        return await fut

    def close(self) -> None:
        self.engine.close(drain=False)


class EngineRouter:
    """Several engines (devices) behind one `label`: the one with the shortest queue first (its depth
    as the engine publishes it, counting every HTTP worker's work); on a full queue the next;
    QueueFull only when all are full."""

    def __init__(self, engines: list):
        if not engines:
            raise ValueError("no label engine")
        self.engines = engines
        self.info = engines[0].info

    @property
    def alive(self) -> bool:
        return all(e.alive for e in self.engines)

    async def label(self, jobs: list[Job]) -> Result:
        full: QueueFull | None = None
        for engine in sorted((e for e in self.engines if e.alive), key=lambda e: e.queue_depth):
            try:
                return await engine.label(jobs)
            except QueueFull as e:
                full = e if full is None or e.retry_after < full.retry_after else full
        if full is not None:
            raise full
        raise EngineError("every label engine is gone")

    def close(self) -> None:
        for e in self.engines:
            e.close()

    @classmethod
    def connect(cls, addresses: list[str], authkey: bytes) -> EngineRouter:
        return cls([RemoteEngine(a, authkey) for a in addresses])


@dataclass
class EnginePool:
    """The supervisor's side: one engine process per device, metrics shared through files."""

    spec: EngineSpec
    devices: list[str]
    processes: list = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    authkey: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _dir: str | None = None

    def start(self, timeout: float = 600.0) -> EnginePool:
        self._dir = tempfile.mkdtemp(prefix="distill-engines-")  # private (0700): sockets and metrics
        os.makedirs(os.path.join(self._dir, "metrics"))
        enable_multiprocess(os.path.join(self._dir, "metrics"))
        ctx = mp.get_context("spawn")
        pipes = []
        for i, device in enumerate(self.devices):
            address = os.path.join(self._dir, f"engine-{i}.sock")
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_engine_main,
                name=f"engine-{device}",
                daemon=False,
                args=(replace(self.spec, device=device), address, self.authkey, child),
            )
            p.start()
            child.close()
            self.processes.append(p)
            self.addresses.append(address)
            pipes.append(parent)
        for p, pipe in zip(self.processes, pipes):
            if not pipe.poll(timeout):
                self.close()
                raise EngineError(f"{p.name} did not become ready in {timeout:.0f}s")
            try:
                kind, detail = pipe.recv()
            except EOFError:
                kind, detail = "error", f"exited with code {p.exitcode}"
            if kind != "ready":
                self.close()
                raise EngineError(f"{p.name} failed to start: {detail}")
        return self

    @property
    def directory(self) -> str:
        """The pool's private directory (mode 0700, removed at close): sockets, metrics, hand-overs."""
        return self._dir

    def env(self) -> dict[str, str]:
        """What an HTTP worker needs to connect (it inherits the environment)."""
        return {ADDRESSES_ENV: ",".join(self.addresses), AUTHKEY_ENV: self.authkey.hex()}

    def failed(self) -> list[str]:
        return [f"{p.name} (exit code {p.exitcode})" for p in self.processes if p.exitcode is not None]

    def close(self) -> None:
        for p in self.processes:
            if p.is_alive():
                p.terminate()
        for p in self.processes:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
                p.join()
            mark_process_dead(p.pid)
        self.processes.clear()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def engines_from_env() -> tuple[list[str], bytes] | None:
    addresses = os.environ.get(ADDRESSES_ENV)
    if not addresses:
        return None
    return addresses.split(","), bytes.fromhex(os.environ[AUTHKEY_ENV])
