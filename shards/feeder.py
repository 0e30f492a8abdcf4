"""The feeder: batch k+1 loaded, copied to the device and rendered while batch k trains.

    with Feeder(loader, lambda batch: images_on_device(batch, policy, device), device) as feed:
        for batch, x in feed:
            ...  # the step; x is ready on the current stream

A thread takes batches from the loader and runs `to_device` on each (the copy, and on CUDA the
render): on CUDA on a stream of its own, recording an event the consumer's stream waits on (the
host never waits for the device), with the tensors handed to the consumer's stream
(`record_stream`) so that the caching allocator does not reuse them while the step runs. At most
`depth` batches wait. An error in any stage (the loader, `to_device`) stops the thread and is
raised in the consumer as it was raised (its type, message and traceback: a MissingLabels stays a
MissingLabels for the caller), with a note naming the stage and the batch; leaving the loop early
(`close`, or the `with` block) stops the thread once it has finished the batch in hand, so the
loader is never read by two threads.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

_END = object()


class FeederError(RuntimeError):
    """The feeder's thread did not stop."""


def _noted(error: BaseException, stage: str, index: int) -> BaseException:
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(f"(in the feeder: {stage} batch {index})")
    return error


class _Failure:
    def __init__(self, stage: str, index: int, error: BaseException):
        self.stage, self.index, self.error = stage, index, error


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class Feeder:
    """(batch, to_device(batch)) of `batches`, made ahead in a thread (see the module docstring).
    `threaded=False` moves each batch when it is asked for (the CPU's default: there the
    loader's workers render, and a thread would only compete with the step for the cores)."""

    def __init__(
        self,
        batches: Iterable,
        to_device: Callable[[Any], Any],
        device: str | torch.device,
        depth: int = 2,
        threaded: bool | None = None,
        join_timeout: float = 600.0,
    ):
        self.batches, self.to_device = batches, to_device
        self.device = torch.device(device)
        self.threaded = self.device.type == "cuda" if threaded is None else threaded
        self.join_timeout = join_timeout
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the producer ----------------------------------------------------------------------
    def _run(self) -> None:
        if self.device.type == "cuda":
            # a new thread's current device is GPU 0: the loader's iterator (made below) starts its
            # pin-memory thread on the current device, and every rank would pin on, and open a
            # context on, GPU 0
            torch.cuda.set_device(self.device)
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        index, stage = 0, "loading"
        try:
            iterator = iter(self.batches)
            while not self._stop.is_set():
                stage = "loading"
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                stage = "moving to the device"
                if stream is None:
                    item = (batch, self.to_device(batch), None)
                else:
                    with torch.cuda.stream(stream):
                        out = self.to_device(batch)
                        ready = torch.cuda.Event()
                        ready.record(stream)
                    item = (batch, out, ready)
                if not self._put(item):
                    return
                index += 1
        except BaseException as e:  # every failure goes to the consumer
            self._put(_Failure(stage, index, e))
            return
        self._put(_END)

    def _put(self, item) -> bool:
        """Put unless stopped (a stopped consumer drains nothing: give up then)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # -- the consumer ----------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        if not self.threaded:
            yield from self._inline()
            return
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise _noted(item.error, item.stage, item.index)
                batch, out, ready = item
                if ready is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(ready)
                    for t in _tensors(out):
                        if t.device.type == "cuda":
                            t.record_stream(current)
                yield batch, out
        finally:
            self.close()

    def _inline(self) -> Iterator[tuple[Any, Any]]:
        index, stage = 0, "loading"
        iterator = iter(self.batches)
        while True:
            try:
                stage = "loading"
                batch = next(iterator)
                stage = "moving to the device"
                out = self.to_device(batch)
            except StopIteration:
                return
            except Exception as e:
                _noted(e, stage, index)
                raise
            yield batch, out
            index += 1

    def close(self) -> None:
        """Stop the thread (after the batch it has in hand) and drop what it made."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.join_timeout)
            if self._thread.is_alive():
                raise FeederError(f"feeder: its thread did not stop within {self.join_timeout:.0f} s")
            self._thread = None
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self) -> Feeder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
