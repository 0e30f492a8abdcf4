"""The HTTP side's handles on label engines, all with one async interface (`await label(jobs)`,
`queue_depth`, `alive`, `info`):

    RemoteEngine    an HTTP worker's connection to one engine process
    LocalEngine     the same over an in-process LabelEngine (tests, embedding)
    EngineRouter    several engines: the one with the shortest queue takes the work, the next if it
                    is full

"Shortest queue" is the engine's whole queue: every engine publishes its depth (items accepted from
every HTTP worker, not yet answered) in shared memory, so the choice does not depend on what one
HTTP worker happened to send.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
from multiprocessing.connection import Client

import numpy as np

from .contract import EngineError, Job, QueueFull, Result, depth_path, engine_info
from .messages import Done, Full, Hello, Label


class RemoteEngine:
    """An HTTP worker's connection to one engine process. Answers come back on a reader thread and
    resolve the waiting request's future (concurrent.futures, awaited through asyncio.wrap_future)."""

    def __init__(self, address: str, authkey: bytes):
        self.address = address
        self.conn = Client(address, family="AF_UNIX", authkey=authkey)
        hello = self.conn.recv()
        if not isinstance(hello, Hello):
            raise EngineError(f"engine at {address} answered {type(hello).__name__} instead of Hello")
        self.info = hello.info
        self._depth = np.memmap(depth_path(address), dtype=np.int64, mode="r", shape=(1,))  # written before Hello
        self.alive = True
        self._ids = itertools.count()
        self._waiting: dict[int, concurrent.futures.Future] = {}
        self._lock = threading.Lock()  # sends, and the waiting map
        threading.Thread(target=self._read, name="engine-reader", daemon=True).start()

    @property
    def queue_depth(self) -> int:
        """The engine's queue: items accepted from every HTTP worker and not yet answered."""
        return int(self._depth[0])

    async def label(self, jobs: list[Job]) -> Result:
        if not self.alive:
            raise EngineError(f"engine on {self.info['device']} is gone")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if any(isinstance(j.source, bytes) for j in jobs):  # uploads: megabytes to pickle and send,
            await asyncio.to_thread(self._send, jobs, fut)  # not on the event loop
        else:  # shard members: a few hundred bytes each
            self._send(jobs, fut)
        return await asyncio.wrap_future(fut)

    def _send(self, jobs: list[Job], fut: concurrent.futures.Future) -> None:
        with self._lock:
            rid = next(self._ids)
            self._waiting[rid] = fut
            try:
                self.conn.send(Label(rid, jobs))
            except OSError as e:
                del self._waiting[rid]
                raise EngineError(f"engine on {self.info['device']} is gone: {e}") from e

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                self.alive = False
                with self._lock:
                    waiting, self._waiting = self._waiting, {}
                for fut in waiting.values():
                    _settle(fut, error=EngineError(f"engine on {self.info['device']} is gone"))
                return
            with self._lock:
                fut = self._waiting.pop(msg.rid, None)
            if fut is None:
                continue
            if isinstance(msg, Done):
                _settle(fut, msg.result)
            elif isinstance(msg, Full):
                _settle(fut, error=QueueFull(msg.message, msg.retry_after))
            else:
                _settle(fut, error=EngineError(msg.message))

    def close(self) -> None:
        self.alive = False
        self.conn.close()


def _settle(fut: concurrent.futures.Future, value=None, error: BaseException | None = None) -> None:
    if fut.set_running_or_notify_cancel():  # False: the waiting request was cancelled
        fut.set_exception(error) if error is not None else fut.set_result(value)


class LocalEngine:
    """RemoteEngine's interface over a LabelEngine in this process."""

    def __init__(self, engine, classes: list[str]):  # a core.LabelEngine
        self.engine = engine
        self.info = engine_info(engine, classes)

    @property
    def alive(self) -> bool:
        return self.engine.failed is None

    @property
    def queue_depth(self) -> int:
        return self.engine.depth

    async def label(self, jobs: list[Job]) -> Result:
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def done(outcome: Result | BaseException) -> None:
            if isinstance(outcome, BaseException):
                _settle(fut, error=outcome)
            else:
                _settle(fut, outcome)

        self.engine.submit(jobs, done)
        return await asyncio.wrap_future(fut)

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
