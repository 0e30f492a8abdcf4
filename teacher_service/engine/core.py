"""The label engine: (image, key, seeds) work in, teacher labels out. The one place the teacher runs
for the precompute job and the service.

Threads of the engine's process and the processes it owns:

    submit() ──> pending ──scheduler──> augment workers (pool.py) ──> shared batch buffers
                                         decode once, augment each seed,     (pinned on CUDA)
                                         write the crop into its slot              │
                                                                                   v
    done(result) <── writer: one bulk store put per batch <── inference: teacher on full batches

- **Dynamic batching, Triton's rules** (`batcher.py`, a state machine the engine drives under its
  lock, each rule unit-tested): a batch holds at most `max_batch_size` crops; it is closed
  when full, or when its oldest item has waited `max_queue_delay_ms` and no closed batch is
  waiting for the teacher (while the teacher is busy, filling the batch further costs nothing).
  The queue is bounded: `submit` refuses work that does not fit (`QueueFull`, the service's 503)
  before any of it is done, or blocks (`block=True`, the precompute feeder's back-pressure).
- **Decode once per batch of seeds:** the seeds of one image that land in one batch go to one
  worker in one task, which decodes the image once.
- **No copies through the engine's interpreter:** workers write crops straight into one of a ring
  of shared-memory batch buffers; the teacher reads the buffer in place (CPU) or copies it to the
  device from page-locked memory on a side stream, overlapping the previous batch's forward.
- **A torch-renderer policy renders where the teacher runs** (`EngineConfig.render`): on an
  accelerator the workers decode, draw each crop's parameters and write its uint8 crop into a
  shared uint8 buffer (an nvjpeg policy's JPEGs stay encoded: the device decodes the batch), and
  the inference thread renders the batch on the device. The crops are the trainer's, bit for bit.
- **Labels are stored before they are answered:** the writer thread does one bulk put per batch,
  then completes the requests whose items are all labeled. A failed put is reported in the result
  (`stored=False`), never hidden.

A worker that dies takes the engine down with a clear `EngineError` for every waiting request (the
pool's futures fail with BrokenProcessPool; a worker that died while no task was out is found at
the next task). The service's supervisor then exits, for the orchestrator to restart it;
precompute stops and resumes from the store when run again. Workers and the engine watch their
parent process and exit when it is gone.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future

import numpy as np
import torch

from distill_core import usable_cpus
from labels.namespace import Namespace, RecordFormat
from labels.store import open_store, redact
from labels.teacher import PendingPrediction, Teacher
from shards import AugmentPolicy
from shards.device_decode import DeviceDecodeError, check_device, crops_on_device
from shards.fingerprint import FingerprintMismatch, difference, render_fingerprint
from shards.plan import BatchPlan
from shards.render import render_batch

from ..metrics import Metrics
from .batcher import Batch, Batcher, Pending, Task
from .contract import EngineConfig, EngineError, Job, QueueFull, Result, check_fits
from .pool import BrokenProcessPool, WorkerPool

log = logging.getLogger(__name__)


def renders_on_device(policy: AugmentPolicy, device: torch.device, render: str = "auto") -> bool:
    """Whether an engine on `device` with `EngineConfig.render` renders a policy's crops there
    (else in its workers, on the CPU)."""
    on_device = render == "device" or (render == "auto" and device.type != "cpu")
    return policy.renderer == "torch" and (on_device or policy.decoder == "nvjpeg")


def render_device(policy: AugmentPolicy, device: torch.device, render: str = "auto") -> torch.device:
    """Where such an engine makes its crops: what a render fingerprint of its labels is made on."""
    return device if renders_on_device(policy, device, render) else torch.device("cpu")


def claim_fingerprint(store, directory, policy, devices: list, split: str, made_by: str, render: str = "auto") -> dict:
    """The render fingerprint of the crops these engines make (on each distinct device), stored
    with the labels unless the namespace has one; FingerprintMismatch, before any label is made,
    when the stored one is not what this machine renders."""
    mine = None
    for device in dict.fromkeys(render_device(policy, d, render) for d in devices):
        made = render_fingerprint(directory, policy, device, split=split, made_by=made_by)
        stored = store.claim_fingerprint(made)
        problem = difference(stored, made)
        if problem:
            raise FingerprintMismatch(
                f"{redact(store.url)} namespace {store.namespace.id}: its labels were made from crops that this "
                f"machine renders differently, and labels of both must not mix: {problem}. Label into another "
                "store (or `labels` namespace), or on a machine that renders like the one that made them"
            )
        mine = mine or made
    return mine


class _Request:
    """One submission's answer in the making. Its arrays are the writer thread's alone; `finish` may
    be called from the writer and from a failure on any thread, and answers exactly once."""

    __slots__ = ("n", "done", "accepted", "classes", "probs", "errors", "remaining", "stored", "_once")

    def __init__(self, n: int, topk: int, done: Callable):
        self.n = n
        self.done = done
        self.accepted = time.perf_counter()
        self.classes = np.full((n, topk), -1, dtype=np.int64)
        self.probs = np.zeros((n, topk), dtype=np.float32)
        self.errors: list[str | None] = [None] * n
        self.remaining = n
        self.stored = True
        self._once = threading.Lock()

    def finish(self, outcome) -> None:
        if not self._once.acquire(blocking=False):  # answered already
            return
        try:
            self.done(outcome)
        except Exception:  # a callback's bug must not stop the engine's threads
            log.exception("label engine: result callback failed")


class LabelEngine:
    """Owns the teacher, the augmentation workers and the batch buffers; see the module docstring."""

    def __init__(
        self,
        teacher: Teacher,
        policy: AugmentPolicy,
        fmt: RecordFormat,
        config: EngineConfig,
        store_url: str | None = None,
        namespace: Namespace | None = None,
        metrics: Metrics | None = None,
    ):
        self.teacher = teacher
        self.policy = policy
        self.fmt = fmt
        self.config = config
        self.store_url = store_url
        self.namespace = namespace
        self.metrics = metrics or Metrics()
        self.device = str(teacher.device)
        if policy.renderer == "torch" and policy.decoder == "nvjpeg":  # decoded where the batch renders
            if config.render == "workers":
                raise ValueError("an nvjpeg policy renders on the teacher's CUDA device, not in the workers")
            check_device(policy, teacher.device)
        self.render_on_device = renders_on_device(policy, teacher.device, config.render)
        # the workers' output: uint8 crops for the device to render, else the finished float crops
        shape = (config.max_batch_size, 3, policy.input_size, policy.input_size)
        dtype = torch.uint8 if self.render_on_device else torch.float32
        self._buffers = [torch.empty(shape, dtype=dtype).share_memory_() for _ in range(config.buffers)]
        self._pinned: list[int] = []
        self._render_stream = None  # CUDA: where a device render runs (see _rendered)
        self._pad_buffer: torch.Tensor | None = None  # a compiled teacher's one batch shape (see _padded)
        # start() and close() own these (the caller's thread):
        self._pool: WorkerPool | None = None
        self._threads: list[threading.Thread] = []
        self._threads_before: int | None = None  # the caller's torch thread count, restored at close
        self._depth_gauge = self.metrics.queue_size.labels(self.device)
        # every thread's (the caller's, the engine's, the pool's callbacks): read and written
        # only under this lock
        self._cond = threading.Condition()
        self._batcher = Batcher(
            config.max_batch_size, config.max_queue_delay_ms / 1000.0, config.buffers, config.workers
        )
        self._live: set[_Request] = set()
        self._depth = 0
        self._rate = 0.0  # labels/s, smoothed: for Retry-After
        self._last_finish: float | None = None
        self._failed: EngineError | None = None
        self._closed = False
        self._writes: collections.deque = collections.deque()  # (batch, classes, probs) for the writer
        self._depth_out: np.ndarray | None = None  # a shared int64 others read the depth from (publish_depth)

    # -- life cycle ------------------------------------------------------------------------
    def start(self, timeout: float = 300.0) -> LabelEngine:
        """Start the workers and wait until each has built its transform, then the threads."""
        if self.teacher.device.type == "cuda":
            self._pin_buffers()
            if self.render_on_device:
                self._render_stream = torch.cuda.Stream(self.teacher.device)
        else:  # the workers have cores of their own; oversubscribing them slows both sides
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.config.teacher_threads or max(1, usable_cpus() - self.config.workers))
        self._pool = WorkerPool(self.config.workers, self._buffers, self.policy.to_json(), self._worker_mode())
        try:
            self._pool.start(timeout)
        except EngineError:
            self.close(drain=False)
            raise
        self._pool.watch(lambda why: self._fail(EngineError(why)))
        for name, target in (("scheduler", self._schedule), ("inference", self._infer), ("writer", self._write)):
            t = threading.Thread(target=self._guarded(name, target), name=f"engine-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "label engine on %s: %d augmentation workers, batches of %d, %d buffers",
            self.device,
            self.config.workers,
            self.config.max_batch_size,
            self.config.buffers,
        )
        return self

    def _guarded(self, name: str, target: Callable[[], None]) -> Callable[[], None]:
        """A thread's body: whatever it raises fails the engine (every waiting request gets the
        error, new work is refused, the service's engine process exits for its supervisor), never
        a thread that is gone while the others wait for it."""

        def run() -> None:
            try:
                target()
            except BaseException as e:
                log.exception("label engine: its %s thread failed", name)
                self._fail(EngineError(f"label engine's {name} thread failed: {type(e).__name__}: {e}"))

        return run

    def _worker_mode(self) -> str:
        """What a worker does with an image: "augment" it, "cut" its crops for the device (decode,
        draw, cut the uint8 crop), or "headers" (nvjpeg: a JPEG stays encoded for the device's
        decoder; other formats are prepared)."""
        if not self.render_on_device:
            return "augment"
        return "headers" if self.policy.decoder == "nvjpeg" else "cut"

    def _pin_buffers(self) -> None:
        """Page-lock the shared buffers in place (cudaHostRegister), so copies to the device are
        asynchronous; without it they still work, synchronously."""
        cudart = torch.cuda.cudart()
        for buf in self._buffers:
            rc = int(cudart.cudaHostRegister(buf.data_ptr(), buf.numel() * buf.element_size(), 1))
            if rc != 0:
                log.warning("could not page-lock the batch buffers (cudaError %d); copies will be synchronous", rc)
                return
            self._pinned.append(buf.data_ptr())

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop; with `drain`, first answer everything accepted (for at most `timeout` seconds)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            if drain:
                self._cond.wait_for(lambda: self._depth == 0 or self._failed is not None, timeout)
        self._fail(EngineError("label engine stopped"), stopping=True)
        for t in self._threads:
            t.join(timeout=10)
        if self._pool is not None:
            self._pool.close()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
        if self._pinned:
            cudart = torch.cuda.cudart()
            for ptr in self._pinned:
                cudart.cudaHostUnregister(ptr)
            self._pinned.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close(drain=exc[0] is None)

    # -- feeding ---------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Items accepted and not yet answered."""
        with self._cond:
            return self._depth

    @property
    def worker_pids(self) -> list[int]:
        """The augmentation workers' process ids."""
        return list(self._pool.pids) if self._pool is not None else []

    def publish_depth(self, out: np.ndarray) -> None:
        """Keep out[0] equal to the depth: a shared-memory int64 that other processes read (the
        HTTP workers' router sends work to the engine whose queue is shortest)."""
        with self._cond:
            self._depth_out = out
            out[0] = self._depth

    def _set_depth(self, depth: int) -> None:
        """Under the lock: the depth, its gauge and its published copy."""
        self._depth = depth
        self._depth_gauge.set(depth)
        if self._depth_out is not None:
            self._depth_out[0] = depth

    def retry_after(self) -> float:
        """Seconds until the queue has likely drained (1 .. 60), with up to 50% random jitter so
        that refused clients do not all come back at once. The drain rate is the recent one; before
        the first batch is done, a batch of `max_batch_size` per second (a guess on the slow side
        for any teacher this engine batches, but not the 1 label/s that told a first burst 60 s)."""
        with self._cond:
            rate = self._rate or self.config.max_batch_size / 1.0
            wait = self._depth / rate * random.uniform(1.0, 1.5)
        return float(min(60, max(1, math.ceil(wait))))

    def submit(self, jobs: list[Job], done: Callable[[Result | BaseException], None], block: bool = False) -> None:
        """Accept all of `jobs` or none. `done` is called once, from an engine thread, with the
        Result or the exception that ended the work. Full queue: QueueFull, or wait (`block`)."""
        n = sum(len(j.seeds) for j in jobs)
        if not block:  # a blocking feeder (precompute) is let in alone when the queue is empty
            check_fits(n, self.config.max_queue_size)
        req = _Request(n, self.fmt.topk, done)
        if n == 0:
            req.finish(self._result(req))
            return
        with self._cond:
            while True:
                if self._failed is not None:
                    raise self._failed
                if self._depth + n <= self.config.max_queue_size or (block and self._depth == 0):
                    break
                if not block:
                    self.metrics.queue_rejected.labels(self.device).inc(n)
                    raise QueueFull(
                        f"queue holds {self._depth} of {self.config.max_queue_size} items", self.retry_after()
                    )
                self._cond.wait()
            self._set_depth(self._depth + n)
            self._live.add(req)
            first = 0
            for job in jobs:
                self._batcher.add(Pending(req, first, req.accepted, job.source, job.key, tuple(job.seeds), job.store))
                first += len(job.seeds)
            self._cond.notify_all()

    # -- scheduler: pending items -> batch slots -> augmentation tasks ---------------------
    def _schedule(self) -> None:
        while True:
            with self._cond:
                tasks = self._next_tasks()
                if tasks is None:
                    return
            for task in tasks:
                try:
                    self._pool.submit(task, lambda fut, task=task: self._task_done(task, fut))
                except BrokenProcessPool as e:  # a worker died while no task was out
                    self._fail(EngineError(f"an augmentation worker died: {e}"))
                    return

    def _next_tasks(self):
        """Under the lock: wait until the batcher has tasks to send, closing batches as it says."""
        while True:
            if self._failed is not None:
                return None
            now = time.perf_counter()
            tasks = self._batcher.fill(now)
            if tasks:
                return tasks
            if self._batcher.close_due(now) is not None:
                self._cond.notify_all()  # the inference thread waits for closed batches
                continue
            wake = self._batcher.wake_at()
            self._cond.wait(None if wake is None else max(0.0, wake - time.perf_counter()))

    # -- the pool's callbacks: a task's crops are written ----------------------------------
    def _task_done(self, task: Task, fut: Future) -> None:
        """On the pool's thread, which swallows what a callback raises: guarded like a thread."""
        self._guarded("augmentation callback", lambda: self._count_task(task, fut))()

    def _count_task(self, task: Task, fut: Future) -> None:
        """Count the task done on its batch (the batch goes to the teacher when all of its tasks
        are). A dead worker fails the engine; a task that raised fails its crops."""
        bid, entries = task
        try:
            _, errors, prepared = fut.result()
        except CancelledError:  # closing: nobody waits for it
            return
        except BrokenProcessPool as e:
            self._fail(EngineError(f"an augmentation worker died: {e}"))
            return
        except Exception as e:  # a bug in the task itself: its crops fail, the engine goes on
            log.exception("label engine: an augmentation task failed")
            errors = {slot: f"{key}: augmentation failed: {e!r}" for _, key, pairs in entries for _, slot in pairs}
            prepared = {}
        with self._cond:
            if self._failed is not None:
                return
            b = self._batcher.owner[bid]
            b.errors.update(errors)
            b.prepared.update(prepared)
            b.outstanding -= 1
            if b.outstanding == 0:
                b.augmented = time.perf_counter()
                self._cond.notify_all()

    # -- inference: one batch in the teacher while the next one's copy is issued ----------
    def _next_ready(self, block: bool) -> Batch | None:
        with self._cond:
            while (b := self._batcher.take_ready()) is None:
                if self._failed is not None or not block:
                    return None
                self._cond.wait()
            self._cond.notify_all()  # the scheduler may close the open batch now
            return b

    def _infer(self) -> None:
        inflight: tuple[Batch, PendingPrediction, float] | None = None
        while True:
            b = self._next_ready(block=inflight is None)
            if b is None and inflight is None:
                return
            launched = None
            if b is not None:
                t0 = time.perf_counter()
                try:
                    launched = (b, self.teacher.launch(self._rendered(b), self.fmt.topk), t0)
                except Exception as e:
                    self._fail(EngineError(f"teacher failed on a batch of {b.n}: {e!r}"))
                    return
            if inflight is not None:
                self._finish(*inflight)
            inflight = launched

    def _rendered(self, b: Batch) -> torch.Tensor:
        """The batch's crops for the teacher. On CUDA a device render runs on a stream of its own
        (the next batch renders while this one's forward runs) and the forward's stream waits
        for it on the device, not the host. A compiled teacher sees one shape: the batch padded
        to `max_batch_size` (the padding's labels are never used)."""
        if self._render_stream is None:
            x = self._pixels(b)
        else:
            with torch.cuda.stream(self._render_stream):
                x = self._pixels(b)
                ready = torch.cuda.Event()
                ready.record(self._render_stream)
            compute = torch.cuda.current_stream(self.teacher.device)
            compute.wait_event(ready)
            x.record_stream(compute)
        if self.teacher.compiled and len(x) < self.config.max_batch_size:
            x = self._padded(x)
        return x

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """`x` in the first rows of a batch of max_batch_size kept on the teacher's device: the copy
        is the one the forward would make anyway, and no host memory is copied or allocated (a
        `torch.cat` on the host cost about 150 MB a batch at 224 px). The rows past `x` hold what
        they held; their labels are never used. Reuse is safe: the copy is issued on the stream
        the previous batch's forward ran on, after it."""
        shape = (self.config.max_batch_size, *x.shape[1:])
        pad = self._pad_buffer
        if pad is None or tuple(pad.shape) != shape or pad.dtype != x.dtype:
            pad = self._pad_buffer = torch.zeros(shape, dtype=x.dtype, device=self.teacher.device)
        pad[: len(x)].copy_(x, non_blocking=True)
        return pad

    def _pixels(self, b: Batch) -> torch.Tensor:
        """The batch's crops: the workers' shared buffer, or rendered on the device here from the
        uint8 crops the workers cut (or the JPEGs they left encoded). A slot whose image failed
        gets a copy of another crop; its label is never used."""
        buf = self._buffers[b.bid]
        if not self.render_on_device:
            return buf[: b.n]
        items = [b.prepared.get(i) for i in range(b.n)]  # (JPEG bytes or None: the crop is in buf, params)
        good = next((i for i, item in enumerate(items) if item is not None), None)
        if good is None:  # every image of the batch failed: nothing to render, no label used
            return torch.zeros((b.n, *buf.shape[1:]), device=self.teacher.device)
        for i, item in enumerate(items):
            if item is None:
                items[i] = items[good]
                buf[i].copy_(buf[good])
        plan = BatchPlan.build([p for _, p in items], self.policy)
        b.prepared.clear()  # the JPEG bytes go now, not when the batch object goes
        device = self.teacher.device
        if all(source is None for source, _ in items):
            return render_batch(buf[: b.n], plan, self.policy, device)
        prepared = [(source if source is not None else buf[i], p) for i, (source, p) in enumerate(items)]
        while True:
            try:
                crops = crops_on_device(prepared, self.policy, device, b.keys)
                break
            except DeviceDecodeError as e:  # that image's label fails (named), never another decoder's pixels
                b.errors[e.index] = str(e)
                if len(b.errors) >= b.n:
                    return torch.zeros((b.n, *buf.shape[1:]), device=device)
                stand_in = next(i for i in range(b.n) if i not in b.errors)
                prepared[e.index] = prepared[stand_in]
        return render_batch(crops, plan, self.policy, device)

    def _finish(self, b: Batch, pending: PendingPrediction, t0: float) -> None:
        try:
            classes, probs = pending.result()
            classes, probs = classes.numpy(), probs.numpy()
        except Exception as e:
            self._fail(EngineError(f"teacher failed on a batch of {b.n}: {e!r}"))
            return
        now = time.perf_counter()
        m, dev = self.metrics, self.device
        m.compute_infer_duration.labels(dev).observe(now - t0)
        m.augment_duration.labels(dev).observe(max(0.0, b.augmented - b.opened))
        m.batch_size.labels(dev).observe(b.n)
        m.batch_fill.labels(dev).observe(b.n / self.config.max_batch_size)
        m.inference_count.labels(dev).inc(b.n)
        queued = m.queue_duration.labels(dev)
        for req in {id(r): r for r, _ in b.slots}.values():
            queued.observe(t0 - req.accepted)
        with self._cond:
            if self._last_finish is not None:
                inst = b.n / max(now - self._last_finish, 1e-6)
                self._rate = inst if not self._rate else 0.8 * self._rate + 0.2 * inst
            self._last_finish = now
            self._writes.append((b, classes, probs))
            self._batcher.release(b.bid)
            self._cond.notify_all()

    # -- writer: store, then answer ----------------------------------------------------
    def _write(self) -> None:
        store = open_store(self.store_url, self.namespace) if self.store_url else None
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._writes or self._failed is not None)
                    if not self._writes:
                        return
                    b, classes, probs = self._writes.popleft()
                self._store_and_answer(store, b, classes, probs)
        finally:
            if store is not None:
                store.close()

    def _store_and_answer(self, store, b: Batch, classes: np.ndarray, probs: np.ndarray) -> None:
        ok = [i for i in range(b.n) if i not in b.errors and b.store[i]]
        stored = True
        if store is not None and ok:
            try:
                store.put(
                    [b.keys[i] for i in ok],
                    [b.seeds[i] for i in ok],
                    classes[ok],
                    probs[ok] if self.fmt.probs else None,
                )
            except Exception as e:  # answered anyway, flagged: the caller decides what it means
                stored = False
                log.warning("labels computed but not stored: %s", e)
        complete = []
        for i, (req, item) in enumerate(b.slots):
            req.classes[item] = classes[i]
            req.probs[item] = probs[i]
            if i in b.errors:
                req.errors[item] = b.errors[i]
            req.stored &= stored
            req.remaining -= 1
            if req.remaining == 0:
                complete.append(req)
        with self._cond:
            if self._failed is None:  # after a failure the requests were answered with the error
                self._set_depth(self._depth - b.n)
            self._live.difference_update(complete)
            self._cond.notify_all()
        for req in complete:
            req.finish(self._result(req))

    @staticmethod
    def _result(req: _Request) -> Result:
        return Result(req.classes, req.probs, req.errors, req.stored)

    # -- failure -----------------------------------------------------------------------
    def _fail(self, error: EngineError, stopping: bool = False) -> None:
        with self._cond:
            if self._failed is None:
                self._failed = error
                if not stopping:
                    log.error("label engine failed: %s", error)
            live, self._live = self._live, set()
            self._batcher.pending.clear()
            self._set_depth(0)
            self._cond.notify_all()
        for req in live:
            req.finish(self._failed)

    @property
    def failed(self) -> EngineError | None:
        with self._cond:
            return self._failed
