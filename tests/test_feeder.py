"""The feeder (shards/feeder.py): batch k+1 prepared in a thread while batch k is used, in order;
an error in any stage reaches the loop as it was raised; a loop that stops early stops it. Run
here in its thread on the CPU (on CUDA the same thread prepares on a stream of its own)."""

from __future__ import annotations

import threading
import time

import pytest

from shards.feeder import Feeder

pytestmark = pytest.mark.unit


def numbers(n: int, log: list, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise KeyError(f"no batch {i}")
        log.append(("loaded", i))
        yield i


def test_batches_come_in_order_prepared_ahead_in_another_thread():
    log, threads = [], set()

    def prepare(i):
        threads.add(threading.current_thread().name)
        log.append(("prepared", i))
        return i * 10

    with Feeder(numbers(6, log), prepare, "cpu", depth=2, threaded=True) as feed:
        got = []
        for batch, out in feed:
            time.sleep(0.05)  # the step: meanwhile the next batches are prepared
            got.append((batch, out))
            log.append(("used", batch))
    assert got == [(i, 10 * i) for i in range(6)]
    assert threads == {"feeder"}
    # batch 1 was prepared before batch 0 had been used: ahead, and never more than depth + 1 ahead
    assert log.index(("prepared", 1)) < log.index(("used", 0))
    for i in range(6):
        ahead = [e for e in log[: log.index(("used", i))] if e[0] == "prepared" and e[1] > i]
        assert len(ahead) <= 3


@pytest.mark.parametrize("threaded", [True, False])
def test_an_error_in_a_stage_reaches_the_loop_as_raised(threaded):
    log = []

    def prepare(i):
        if i == 3:
            raise FloatingPointError("render of 3 went wrong")
        return i

    seen = []
    with pytest.raises(FloatingPointError, match="render of 3 went wrong") as e:
        with Feeder(numbers(10, log), prepare, "cpu", threaded=threaded) as feed:
            for batch, _ in feed:
                seen.append(batch)
    assert seen == [0, 1, 2]
    assert "(in the feeder: moving to the device batch 3)" in e.value.__notes__  # Python >= 3.11 (the project's CI)
    with pytest.raises(KeyError, match="no batch 2") as e:  # the loader's own error, its own type
        for _ in Feeder(numbers(10, log, fail_at=2), lambda i: i, "cpu", threaded=threaded):
            pass
    assert "(in the feeder: loading batch 2)" in e.value.__notes__
    assert not [t for t in threading.enumerate() if t.name == "feeder"]  # the thread is gone


def test_a_loop_that_stops_early_stops_the_thread_before_the_loader_is_read_again():
    log = []
    feed = Feeder(numbers(1000, log), lambda i: i, "cpu", depth=2, threaded=True)
    for batch, _ in feed:
        if batch == 4:
            break
    feed.close()
    assert not [t for t in threading.enumerate() if t.name == "feeder"]
    loaded = [i for kind, i in log if kind == "loaded"]
    assert 5 <= len(loaded) <= 4 + 1 + 2 + 1  # what was used, the batch in hand, the queue, one more
    again = len(log)
    time.sleep(0.2)
    assert len(log) == again  # nothing reads the loader any more


def test_the_feeder_thread_works_on_its_own_device_before_the_loader_starts(monkeypatch):
    """On CUDA the feeder's thread sets its device before it makes the loader's iterator: a new
    thread's current device is GPU 0, and the DataLoader starts its pin-memory thread on the current
    device when its iterator is made (every rank pinned on, and opened a context on, GPU 0). Here
    the CUDA calls are stand-ins that record what happens, in which thread."""
    import contextlib

    import torch

    calls = []

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_event(self, event):
            pass

    class Event:
        def record(self, stream=None):
            pass

    def set_device(device):
        calls.append(("set_device", str(torch.device(device)), threading.current_thread().name))

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())

    class Loader:
        def __iter__(self):
            calls.append(("iterator", threading.current_thread().name))
            yield from range(3)

    got = [batch for batch, _ in Feeder(Loader(), lambda b: b, "cuda:1", threaded=True)]
    assert got == [0, 1, 2]
    assert calls[:2] == [("set_device", "cuda:1", "feeder"), ("iterator", "feeder")], calls
