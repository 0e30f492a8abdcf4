"""What a label engine takes and gives, and how it refuses: the types every side of the engine
shares (the engine itself, its process server, the HTTP workers' client, the service's routes).

It imports no torch and no multiprocessing, so that a module which only talks to an engine (an
HTTP route, a client) does not load the engine's implementation;
`tests/test_engine.py::test_the_engine_contract_loads_no_torch` holds it to that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from distill_core.system import usable_cpus

if TYPE_CHECKING:
    from shards.members import Member


class EngineError(RuntimeError):
    """The engine failed or stopped; the work was not labeled."""


class QueueFull(RuntimeError):
    """The engine's queue cannot take the work; nothing of it was started."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class RequestTooLarge(ValueError):
    """The work is more than the engine's whole queue holds: it could never be accepted, so it is
    refused as such (the service's 413), not as a full queue to retry (503)."""


def check_fits(n: int, max_queue_size: int) -> None:
    """RequestTooLarge when `n` labels to compute are more than the whole queue holds."""
    if n > max_queue_size:
        raise RequestTooLarge(
            f"{n} labels to compute exceed the teacher's queue of {max_queue_size} items; "
            f"send at most {max_queue_size} misses per request (or precompute them)"
        )


@dataclass(frozen=True)
class Job:
    """One image and the seeds to label it under. `source` is a shard member or encoded bytes.
    `store`: False answers its labels without writing them to the store (uploads: the service
    keeps those in a bounded cache of its own, so clients cannot grow the store)."""

    source: Member | bytes
    key: str
    seeds: tuple[int, ...]
    store: bool = True


@dataclass
class Result:
    """Labels of a submission's items, in job order (all seeds of job 0, then job 1, ...)."""

    classes: np.ndarray  # int64 [n, topk]
    probs: np.ndarray  # float32 [n, topk]
    errors: list[str | None]  # per item: why it has no label (e.g. undecodable image)
    stored: bool  # every label was written to the store


@dataclass
class EngineConfig:
    max_batch_size: int = 64
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 4096  # items accepted and not yet answered
    workers: int = 0  # augmentation processes; 0: one per CPU core, at most 8
    buffers: int = 4  # shared batch buffers: one in the teacher, one waiting, the rest filling
    teacher_threads: int = 0  # CPU teacher's intra-op threads; 0: the cores the workers leave (>= 1)
    # where a torch-renderer policy's pixels are drawn: "device" (the teacher's; the workers
    # decode and cut the uint8 crops, or for nvJPEG only read JPEG headers, and draw parameters),
    # "workers" (each crop in a worker, on its CPU), "auto" (device when the teacher is not on the
    # CPU, and always for nvJPEG). The same crops either way.
    render: str = "auto"

    def __post_init__(self):
        if self.max_batch_size < 1 or self.max_queue_size < 1 or self.buffers < 2:
            raise ValueError("max_batch_size and max_queue_size must be >= 1 and buffers >= 2")
        if self.render not in ("auto", "device", "workers"):
            raise ValueError(f"render must be auto, device or workers, not {self.render!r}")
        self.workers = self.workers or max(1, min(8, usable_cpus()))


def depth_path(address: str) -> str:
    """Where the engine process listening at `address` publishes its queue depth (a shared int64
    that every HTTP worker's router reads)."""
    return address + ".depth"


def engine_info(engine, classes: list[str]) -> dict:
    """What an engine says about itself to its clients (the `Hello` message, the service's /info)."""
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
