"""Dynamic batching with Triton's rules, as a state machine: no threads, no clock of its own.

Pending items go in; batches come out, each a shared buffer's worth of slots and the augmentation
tasks that fill them. The label engine drives it under its lock and gives it the time, so every
rule below is a unit test (tests/test_batcher.py) instead of a timing-dependent end-to-end run:

- a batch holds at most `max_batch_size` items, in one of `buffers` shared buffers; while no
  buffer is free, items wait (the teacher and the writer give buffers back);
- a full batch closes at once;
- a batch that is not full closes when its oldest item has waited `max_queue_delay_s` and no
  closed batch is waiting for the teacher: while one waits, filling this one further costs
  nothing;
- an image's seeds that land in one batch go to one augmentation task (one decode), unless they
  alone are more than a task's share of the batch; the slots are spread over the workers in
  about equal tasks.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any

# An augmentation task: (buffer id, [(image source, key, [(seed, slot), ...]), ...]).
Task = tuple[int, list[tuple[Any, str, list[tuple[int, int]]]]]


@dataclass
class Pending:
    """Seeds of one image not yet given a batch slot. `owner` is the request they belong to, and
    `first` the request's item number of seeds[0]; `accepted` is when the request was accepted."""

    owner: Any
    first: int
    accepted: float
    source: Any
    key: str
    seeds: tuple[int, ...]
    store: bool = True  # False: answered, never written to the label store (uploads)


@dataclass
class Batch:
    bid: int  # which shared buffer
    slots: list[tuple[Any, int]] = field(default_factory=list)  # (owner, item) per slot
    keys: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    store: list[bool] = field(default_factory=list)  # per slot: its label goes to the store
    errors: dict[int, str] = field(default_factory=dict)
    prepared: dict[int, tuple] = field(default_factory=dict)  # slot -> (region or JPEG, params): device rendering
    outstanding: int = 0  # augmentation tasks not yet done
    deadline: float = math.inf  # when its oldest item has waited max_queue_delay_s
    opened: float = 0.0
    augmented: float = 0.0

    @property
    def n(self) -> int:
        return len(self.slots)


class Batcher:
    """See the module docstring. Not thread-safe: the caller holds its lock around every call."""

    def __init__(self, max_batch_size: int, max_queue_delay_s: float, buffers: int, workers: int):
        if max_batch_size < 1 or buffers < 1 or workers < 1:
            raise ValueError("max_batch_size, buffers and workers must be >= 1")
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.workers = workers
        self.pending: collections.deque[Pending] = collections.deque()
        self.free: collections.deque[int] = collections.deque(range(buffers))
        self.owner: dict[int, Batch] = {}  # buffer id -> the batch using it
        self.open: Batch | None = None
        self.closed: collections.deque[Batch] = collections.deque()  # waiting for the teacher, in order

    def add(self, item: Pending) -> None:
        self.pending.append(item)

    def fill(self, now: float) -> list[Task]:
        """Give pending seeds slots of the open batch (opening one on a free buffer): the tasks that
        augment them, or [] when no slot or no item is there."""
        b = self.open
        if b is None and self.pending and self.free:
            b = self.open = Batch(self.free.popleft(), opened=now)
            self.owner[b.bid] = b
        if b is None or not self.pending or b.n >= self.max_batch_size:
            return []
        room = self.max_batch_size - b.n
        entries = []  # (source, key, [(seed, slot)])
        while room and self.pending:
            item = self.pending[0]
            take = item.seeds[:room]
            if len(take) == len(item.seeds):
                self.pending.popleft()
            else:
                self.pending[0] = Pending(
                    item.owner, item.first + len(take), item.accepted, item.source, item.key, item.seeds[len(take) :],
                    item.store,
                )  # fmt: skip
            if not b.slots:
                b.deadline = item.accepted + self.max_queue_delay_s
            pairs = []
            for i, seed in enumerate(take):
                pairs.append((seed, b.n))
                b.slots.append((item.owner, item.first + i))
                b.keys.append(item.key)
                b.seeds.append(seed)
                b.store.append(item.store)
            entries.append((item.source, item.key, pairs))
            room -= len(take)
        tasks = split_tasks(b.bid, entries, self.workers)
        b.outstanding += len(tasks)
        return tasks

    def close_due(self, now: float) -> Batch | None:
        """Close the open batch if a rule says so (full; or past its deadline with no closed batch
        waiting for the teacher): the batch closed, else None."""
        b = self.open
        if b is None or not b.n:
            return None
        if b.n < self.max_batch_size and (now < b.deadline or self.closed):
            return None
        self.open = None
        self.closed.append(b)
        return b

    def wake_at(self) -> float | None:
        """When a rule may fire without new input (the open batch's deadline), or None: not before
        new items come, a closed batch goes to the teacher, or a buffer comes back."""
        b = self.open
        if b is not None and b.n and not self.closed:
            return b.deadline
        return None

    def take_ready(self) -> Batch | None:
        """The oldest closed batch, once all of its crops are written (batches go out in order)."""
        if self.closed and self.closed[0].outstanding == 0:
            return self.closed.popleft()
        return None

    def release(self, bid: int) -> None:
        """The teacher is done with a batch's buffer: it can hold the next batch."""
        if self.owner.pop(bid, None) is not None:
            self.free.append(bid)


def split_tasks(bid: int, entries: list, workers: int) -> list[Task]:
    """Spread new slots over `workers` in about equal tasks; an image's seeds stay in one task (one
    decode) unless they alone are more than a task's share."""
    per_task = math.ceil(sum(len(e[2]) for e in entries) / workers) if entries else 1
    tasks: list[Task] = []
    current, size = [], 0
    for source, key, pairs in entries:
        for start in range(0, len(pairs), per_task):
            piece = pairs[start : start + per_task]
            current.append((source, key, piece))
            size += len(piece)
            if size >= per_task:
                tasks.append((bid, current))
                current, size = [], 0
    if current:
        tasks.append((bid, current))
    return tasks
