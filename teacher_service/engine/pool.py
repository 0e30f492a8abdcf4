"""The engine's augmentation workers: a `concurrent.futures.ProcessPoolExecutor` (spawn) whose
initializer is `worker.init` and whose tasks are `worker.run`.

The executor does what the engine once did by hand: task and result queues, a thread that
collects results, and noticing a dead worker (it waits on the processes' sentinels and fails
every pending future with `BrokenProcessPool`, the engine's cue to fail its waiting requests). A
worker that dies while no task is out fails no future; `watch` waits on the workers' process file
descriptors (pidfd) for that, so the engine fails at once instead of at its next batch. The
shared batch buffers travel once, as the initializer's arguments (torch's shared-memory handles).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait

import torch
import torch.multiprocessing as mp

from . import worker
from .contract import EngineError

__all__ = ["BrokenProcessPool", "WorkerPool"]

log = logging.getLogger(__name__)


class WorkerPool:
    """`workers` augmentation processes writing into `buffers`; see the module docstring."""

    def __init__(self, workers: int, buffers: list[torch.Tensor], policy_json: str, mode: str):
        self.workers = workers
        self._ctx = mp.get_context("spawn")
        self._barrier = self._ctx.Barrier(workers)
        self._executor = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=self._ctx, initializer=worker.init, initargs=(buffers, policy_json, mode, self._barrier)
        )
        self.pids: list[int] = []
        self._closing = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # wakes the watch thread at close
        self._watching = False

    def start(self, timeout: float) -> WorkerPool:
        """Start every worker and wait until each has run its initializer (timm's transform built):
        EngineError when one fails to start or the time runs out."""
        ready = [self._executor.submit(worker.ready, timeout) for _ in range(self.workers)]
        try:
            self.pids = [f.result(timeout=timeout + 5) for f in ready]
        except Exception as e:
            self.close()
            raise EngineError(f"augmentation workers did not start: {type(e).__name__}: {e}") from e
        return self

    def watch(self, on_death: Callable[[str], None]) -> None:
        """Call `on_death(why)` once, from a thread of its own, when a worker process exits before
        `close` (waiting on pidfds: no polling). Without pidfd (not Linux >= 5.3) a death is found
        when a task fails."""
        try:
            fds = [os.pidfd_open(pid) for pid in self.pids]
        except (AttributeError, OSError) as e:
            log.info("augmentation workers: no pidfd (%s); a death is found at the next task", e)
            return

        def run() -> None:
            try:
                ready = wait([*fds, self._wake_r])
                if not self._closing.is_set():
                    dead = [pid for pid, fd in zip(self.pids, fds) if fd in ready]
                    on_death(f"an augmentation worker died (pid {dead[0] if dead else '?'})")
            finally:
                for fd in (*fds, self._wake_r):
                    os.close(fd)

        self._watching = True  # the thread closes the pipe's reading end
        threading.Thread(target=run, name="engine-worker-watch", daemon=True).start()

    def submit(self, task, done: Callable[[concurrent.futures.Future], None]) -> None:
        """Run one augmentation task; `done(future)` is called with its outcome, from the
        executor's thread. Raises BrokenProcessPool when a worker has died since the last task."""
        self._executor.submit(worker.run, task).add_done_callback(done)

    def close(self) -> None:
        """Cancel what has not started, wait for what has (a task is one batch's share of crops)."""
        if self._closing.is_set():
            return
        self._closing.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._executor.shutdown(wait=True, cancel_futures=True)
        for fd in (self._wake_w,) if self._watching else (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
