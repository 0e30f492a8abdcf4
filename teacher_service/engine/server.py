"""An engine process: one device's teacher and LabelEngine behind a private Unix socket.

Why a process: the HTTP event loop, JSON work and the teacher's batch loop must not share one
interpreter and its GIL (the layout of Triton, TorchServe, LitServe and Ray Serve). The engine
process owns a LabelEngine and listens on a Unix socket (multiprocessing.connection, with an
authentication key); any number of HTTP worker processes connect to it and exchange the typed
messages of `messages.py`. It publishes its queue depth in a shared int64 beside the socket
(`contract.depth_path`), which every HTTP worker's router reads.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener

import numpy as np

from labels.teacher import TeacherSettings

from ..metrics import Metrics
from .contract import EngineConfig, EngineError, QueueFull, Result, depth_path, engine_info
from .core import LabelEngine, claim_fingerprint
from .messages import Done, Failed, Full, Hello, Label

log = logging.getLogger(__name__)


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
    shards: str | None = None  # the data set: where the render fingerprint's crops come from


def engine_main(spec: EngineSpec, address: str, authkey: bytes, ready: Connection) -> None:
    """An engine process: teacher + LabelEngine + a Unix-socket server; exits when its engine fails,
    on SIGTERM (after draining briefly) or when its parent is gone."""
    from distill_core.process import exit_with_parent
    from labels.namespace import RecordFormat
    from labels.provenance import check_labelled_bytes
    from labels.store import open_store
    from labels.teacher import Teacher
    from shards import AugmentPolicy, Manifest

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
        # create the namespace (and extend its seed range) now: fail early when the store is
        # unreachable, or when its labels were made from crops this device renders differently
        with open_store(spec.store_url, namespace, seed_limit=spec.seed_limit) as store:
            if spec.shards:
                where = f"serve {spec.shards} with namespace {namespace.id}"
                check_labelled_bytes(store.coverage(), Manifest.load(spec.shards), "train", where)
                claim_fingerprint(store, spec.shards, policy, [teacher.device], "train", "serve", spec.config.render)
            else:
                log.warning("no --shards: no render fingerprint is stored with, or checked against, the labels")
        engine = LabelEngine(teacher, policy, fmt, spec.config, spec.store_url, namespace, Metrics()).start()
        engine.publish_depth(np.memmap(depth_path(address), dtype=np.int64, mode="w+", shape=(1,)))
        listener = Listener(address, family="AF_UNIX", authkey=authkey)
    except Exception as e:
        ready.send(("error", f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from e
    info = engine_info(engine, classes)
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
            send(Failed(rid, str(outcome)) if isinstance(outcome, BaseException) else Done(rid, outcome))

        return done

    send(Hello(info))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            conn.close()
            return
        if not isinstance(msg, Label):
            log.warning("engine connection: unexpected %s, closing it", type(msg).__name__)
            conn.close()
            return
        try:
            engine.submit(msg.jobs, answer(msg.rid))
        except QueueFull as e:
            send(Full(msg.rid, str(e), e.retry_after))
        except EngineError as e:
            send(Failed(msg.rid, str(e)))
