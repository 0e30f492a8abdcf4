"""A Triton-style dynamic batcher: max batch size, max queue delay, bounded queue.

Requests put items (augmented crops) in a bounded queue and await futures. One inference thread
takes the first waiting item, gathers more until the batch is full or the oldest item has waited
`max_queue_delay`, runs the teacher, and resolves the futures on the event loop. The event loop
never runs the model. When the queue cannot take a request's items, `QueueFull` is raised before
anything is enqueued and the route answers 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass

import torch

from ..teacher import Teacher
from .metrics import Metrics


class QueueFull(RuntimeError):
    pass


@dataclass
class _Item:
    x: torch.Tensor
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float


class DynamicBatcher:
    def __init__(self, teacher: Teacher, topk: int, metrics: Metrics, max_batch_size: int = 64,
                 max_queue_delay_ms: float = 5.0, max_queue_size: int = 4096):
        self.teacher = teacher
        self.topk = topk
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self._queue: collections.deque[_Item] = collections.deque()
        self._staging: torch.Tensor | None = None  # pinned input buffer, reused by every batch
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="teacher-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit_many(self, xs: list[torch.Tensor]) -> list[asyncio.Future]:
        """Enqueue all of xs or none (QueueFull)."""
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        with self._cond:
            if len(self._queue) + len(xs) > self.max_queue_size:
                self.metrics.queue_rejected.inc(len(xs))
                raise QueueFull(f"queue holds {len(self._queue)} of {self.max_queue_size} items")
            items = [_Item(x, loop.create_future(), loop, now) for x in xs]
            self._queue.extend(items)
            self.metrics.queue_size.set(len(self._queue))
            self._cond.notify()
        return [i.future for i in items]

    def _take_batch(self) -> list[_Item]:
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait()
            if self._stop:
                return []
            deadline = self._queue[0].enqueued + self.max_delay
            while len(self._queue) < self.max_batch_size and not self._stop:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(self.max_batch_size, len(self._queue))
            batch = [self._queue.popleft() for _ in range(n)]
            self.metrics.queue_size.set(len(self._queue))
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            start = time.perf_counter()
            for it in batch:
                self.metrics.queue_duration.observe(start - it.enqueued)
            try:
                classes, probs = self.teacher.predict(self._stack([it.x for it in batch]), self.topk)
                results = [(classes[i].tolist(), probs[i].tolist()) for i in range(len(batch))]
                error = None
            except Exception as e:  # a failed batch fails its requests, not the service
                results, error = None, e
            self.metrics.compute_infer_duration.observe(time.perf_counter() - start)
            self.metrics.batch_size.observe(len(batch))
            self.metrics.inference_count.inc(len(batch))
            for i, it in enumerate(batch):
                it.loop.call_soon_threadsafe(_resolve, it.future, None if error else results[i], error)

    def _stack(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """Stack into one reused page-locked buffer on CUDA: pinning a fresh tensor per batch
        (cudaHostAlloc) cost more than the teacher's forward. predict() synchronizes, so the
        buffer is free again when the next batch is stacked."""
        if self.teacher.device.type != "cuda":
            return torch.stack(xs)
        shape = (self.max_batch_size, *xs[0].shape)
        if self._staging is None or self._staging.shape != shape:
            self._staging = torch.empty(shape, dtype=xs[0].dtype, pin_memory=True)
        return torch.stack(xs, out=self._staging[: len(xs)])

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10)


def _resolve(fut: asyncio.Future, result, error) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
