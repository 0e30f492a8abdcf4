"""The engine's batching rules, one test each, on the pure Batcher: the clock is an argument, so
no test waits or depends on timing."""

import pytest

from teacher_service.engine.batcher import Batcher, Pending, split_tasks

pytestmark = pytest.mark.unit

DELAY = 0.005  # max_queue_delay_s


def item(key: str, seeds, accepted: float = 0.0, owner="r", first: int = 0) -> Pending:
    return Pending(owner, first, accepted, f"src:{key}", key, tuple(seeds))


def slots_of(tasks) -> list[int]:
    return sorted(slot for _, entries in tasks for _, _, pairs in entries for _, slot in pairs)


def test_a_full_batch_closes_at_once_and_the_rest_waits_for_the_next():
    b = Batcher(max_batch_size=4, max_queue_delay_s=DELAY, buffers=2, workers=1)
    b.add(item("a", range(6)))
    tasks = b.fill(now=0.0)
    assert slots_of(tasks) == [0, 1, 2, 3]
    assert b.fill(now=0.0) == []  # the open batch is full
    closed = b.close_due(now=0.0)  # full: no deadline needed
    assert closed is not None and closed.seeds == [0, 1, 2, 3] and closed.keys == ["a"] * 4
    assert [p.seeds for p in b.pending] == [(4, 5)]
    nxt = b.fill(now=0.0)  # the second buffer takes the rest; the slot numbers start again
    assert slots_of(nxt) == [0, 1] and b.open.seeds == [4, 5]
    assert b.open.slots == [("r", 4), ("r", 5)]  # request items continue where the first batch stopped


def test_a_batch_that_is_not_full_closes_at_its_oldest_items_deadline():
    b = Batcher(max_batch_size=8, max_queue_delay_s=DELAY, buffers=2, workers=1)
    b.add(item("a", [0], accepted=10.0))
    b.fill(now=10.001)
    b.add(item("b", [0], accepted=10.003))
    b.fill(now=10.003)
    assert b.wake_at() == pytest.approx(10.005)  # the first item's deadline, not the second's
    assert b.close_due(now=10.004) is None
    closed = b.close_due(now=10.005)
    assert closed is not None and closed.keys == ["a", "b"]
    assert b.wake_at() is None  # nothing open: nothing to wake for until new input


def test_past_its_deadline_a_batch_keeps_filling_while_another_waits_for_the_teacher():
    b = Batcher(max_batch_size=4, max_queue_delay_s=DELAY, buffers=3, workers=1)
    b.add(item("a", [0, 1, 2, 3]))
    b.fill(now=0.0)
    first = b.close_due(now=0.0)
    b.add(item("b", [0], accepted=0.0))
    b.fill(now=0.0)
    assert b.close_due(now=1.0) is None, "closed while a closed batch waits for the teacher"
    assert b.wake_at() is None  # it waits for the teacher to take the closed batch, not for a clock
    b.add(item("c", [0]))
    b.fill(now=1.0)
    assert b.open.keys == ["b", "c"]  # filled further at no cost
    first.outstanding = 0
    assert b.take_ready() is first  # the teacher takes it ...
    assert b.close_due(now=1.0).keys == ["b", "c"]  # ... and the overdue batch closes


def test_no_free_buffer_no_new_batch():
    b = Batcher(max_batch_size=2, max_queue_delay_s=DELAY, buffers=1, workers=1)
    b.add(item("a", [0, 1, 2]))
    b.fill(now=0.0)
    batch = b.close_due(now=0.0)
    assert b.fill(now=0.0) == [] and b.open is None  # the only buffer is in use
    batch.outstanding = 0
    assert b.take_ready() is batch
    assert b.fill(now=0.0) == []  # taken by the teacher, but its buffer is not back yet
    b.release(batch.bid)
    assert slots_of(b.fill(now=0.0)) == [0] and b.open.bid == batch.bid


def test_closed_batches_go_to_the_teacher_in_order_once_augmented():
    b = Batcher(max_batch_size=1, max_queue_delay_s=DELAY, buffers=2, workers=1)
    b.add(item("a", [0, 1]))
    b.fill(now=0.0)
    one = b.close_due(now=0.0)
    b.fill(now=0.0)
    two = b.close_due(now=0.0)
    assert b.take_ready() is None  # tasks outstanding
    two.outstanding = 0
    assert b.take_ready() is None  # the second is ready, the first not: order is kept
    one.outstanding = 0
    assert b.take_ready() is one and b.take_ready() is two


def test_an_images_seeds_stay_in_one_task_unless_they_exceed_a_share():
    entries = [("s1", "a", [(0, 0), (1, 1)]), ("s2", "b", [(0, 2), (1, 3)])]
    tasks = split_tasks(7, entries, workers=2)
    assert [[key for _, key, _ in e] for _, e in tasks] == [["a"], ["b"]]  # one decode per image
    assert all(bid == 7 for bid, _ in tasks)
    big = [("s1", "a", [(s, s) for s in range(8)])]
    tasks = split_tasks(0, big, workers=4)  # one image, 8 seeds, 4 workers: split, 2 seeds each
    assert [len(e[0][2]) for _, e in tasks] == [2, 2, 2, 2]
    assert slots_of(tasks) == list(range(8))


def test_fill_counts_the_tasks_it_hands_out():
    b = Batcher(max_batch_size=8, max_queue_delay_s=DELAY, buffers=1, workers=2)
    b.add(item("a", [0, 1], owner="r1"))
    b.add(item("b", [0, 1], owner="r2"))
    tasks = b.fill(now=0.0)
    assert len(tasks) == 2 and b.open.outstanding == 2
    assert b.open.slots == [("r1", 0), ("r1", 1), ("r2", 0), ("r2", 1)]
