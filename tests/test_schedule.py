"""The seed schedule (shards/schedule.py) and DeiT's dealing of it to ranks and workers
(shards/stream.py `plan_dealt`): properties checked over many shapes, without reading images."""

from __future__ import annotations

import collections
import random

import pytest

from shards.schedule import RepeatSchedule, same_pairs
from shards.stream import Share, batches_per_rank, plan_dealt

pytestmark = pytest.mark.unit


def shapes(count: int = 40):
    """Random split shapes: shard sizes, repeats, batch size, ranks, workers."""
    rng = random.Random(0)
    for _ in range(count):
        shards = tuple(rng.randint(1, 40) for _ in range(rng.randint(1, 12)))
        repeats = rng.choice([1, 2, 3, 4])
        world = rng.choice([1, 2, 3, 4, 8])
        total, batch = -(-sum(shards) // repeats) * repeats, rng.randint(1, 16)
        try:  # a shape whose ranks cannot all get the same number of non-empty batches is refused
            batches_per_rank(total, batch, world)
        except ValueError:
            continue
        yield shards, repeats, batch, world, rng.choice([1, 2, 3])


def dealt_pairs(schedule: RepeatSchedule, batch: int, epoch: int, world: int, workers: int):
    """{rank: [(shard, index, seed), ...]} and {rank: batches}, from the plans alone."""
    out, batches = collections.defaultdict(list), {}
    for rank in range(world):
        batches[rank] = 0
        for w in range(workers):
            plan = plan_dealt(schedule, batch, epoch, Share(rank, world, w, workers))
            batches[rank] += len(plan.sizes)
            if not plan.sizes:
                continue
            images = [(p.shard, i) for p in plan.pieces for i in p.images(schedule.shard_samples[p.shard])]
            lo, hi = plan.position_range()
            for p in range(lo, hi + 1, world):
                s, i = images[p // schedule.repeats]
                out[rank].append((s, i, schedule.seed(s, i, epoch, p % schedule.repeats)))
    return out, batches


@pytest.mark.parametrize("shape", list(shapes()))
def test_each_selected_pair_once_per_epoch_with_equal_batches(shape):
    shards, repeats, batch, world, workers = shape
    schedule = RepeatSchedule(shards, repeats)
    n = sum(shards)
    for epoch in (0, 1, 5):
        pairs, batches = dealt_pairs(schedule, batch, epoch, world, workers)
        assert len(set(batches.values())) == 1  # every rank the same number of batches
        every = [p for rank in pairs.values() for p in rank]
        assert len(every) == len(set(every)) == schedule.samples_per_epoch  # each pair once
        assert n <= schedule.samples_per_epoch < n + repeats  # about N samples an epoch
        images = collections.Counter((s, i) for s, i, _ in every)
        assert set(images.values()) == {repeats} and len(images) == -(-n // repeats)
        if world >= repeats:  # an image's R crops land on R different ranks
            where = collections.defaultdict(set)
            for rank, items in pairs.items():
                for s, i, _ in items:
                    where[(s, i)].add(rank)
            assert all(len(ranks) == repeats for ranks in where.values())


@pytest.mark.parametrize("shape", list(shapes(12)))
def test_the_selection_does_not_depend_on_world_size_or_workers(shape):
    shards, repeats, batch, _, _ = shape
    schedule = RepeatSchedule(shards, repeats)
    reference = None
    for world, workers in ((1, 1), (2, 3), (3, 1), (4, 2)):
        try:
            batches_per_rank(schedule.samples_per_epoch, batch, world)
        except ValueError:
            continue
        pairs, _ = dealt_pairs(schedule, batch, 3, world, workers)
        got = sorted(p for rank in pairs.values() for p in rank)
        reference = reference or got
        assert got == reference


@pytest.mark.parametrize("repeats", [1, 2, 3])
def test_seeds_are_dense_per_image_and_cover_a_run(repeats):
    """Over E epochs image i gets seeds 0 .. K_i*R-1, each once: dense store rows; E x N pairs."""
    shards = (37, 40, 40, 12, 40, 29)
    schedule, epochs = RepeatSchedule(shards, repeats), 12
    seen = collections.defaultdict(list)
    for epoch in range(epochs):
        pairs, _ = dealt_pairs(schedule, 16, epoch, 2, 2)
        for items in pairs.values():
            for s, i, seed in items:
                seen[(s, i)].append(seed)
    for (s, i), seeds in seen.items():
        assert sorted(seeds) == list(range(len(seeds)))
        assert schedule.seeds_for_run(s, i, epochs) == range(len(seeds))
    assert sum(map(len, seen.values())) == schedule.labels_for_run(epochs) == epochs * schedule.samples_per_epoch
    per_image = [len(v) / repeats for v in seen.values()]
    assert abs(sum(per_image) / len(per_image) - epochs / repeats) < 0.5  # each image ~ E/R times


def test_the_all_mode_keeps_the_old_seeds():
    schedule = RepeatSchedule((10, 10), 3, "all")
    assert schedule.samples_per_epoch == 60
    assert schedule.seed(1, 4, epoch=7, repeat=2) == 7 * 3 + 2
    assert schedule.seeds_for_run(0, 0, 5) == range(15)
    with pytest.raises(ValueError, match="repeat mode"):
        RepeatSchedule((10,), 3, "sometimes")


def test_one_repeat_asks_the_same_pairs_in_both_modes():
    a, b = RepeatSchedule((9, 7, 11), 1, "deit"), RepeatSchedule((9, 7, 11), 1, "all")
    assert a.samples_per_epoch == b.samples_per_epoch == 27
    assert all(a.seed(s, 0, e, 0) == b.seed(s, 0, e, 0) == e for s in range(3) for e in range(6))
    assert same_pairs(a.describe(), b.describe())
    assert not same_pairs(RepeatSchedule((9,), 3).describe(), RepeatSchedule((9,), 3, "all").describe())


def test_a_run_is_covered_only_by_finished_records_of_its_pairs():
    from student_trainer.data import covering_records

    deit3 = RepeatSchedule((40, 40, 40), 3)
    rec = {**deit3.describe(), "epochs": 10}
    assert covering_records([{**rec, "node_rank": 0, "num_nodes": 1}], deit3, 10)
    old = {"repeat_mode": "deit", "repeats": 3, "epochs": 10, "node_rank": 0, "num_nodes": 1}  # schedule 1
    assert not covering_records([old], deit3, 10)
    assert not covering_records([{**rec, "node_rank": 0, "num_nodes": 1}], deit3, 11)  # too few epochs
    assert not covering_records([{**rec, "node_rank": 0, "num_nodes": 2}], deit3, 5)  # node 1 not done
    assert covering_records([{**rec, "node_rank": r, "num_nodes": 2} for r in (1, 0)], deit3, 5)
    assert not covering_records([{**rec, "repeat_mode": "all", "node_rank": 0, "num_nodes": 1}], deit3, 5)
    assert covering_records([{"seeds": 30, "node_rank": 0, "num_nodes": 1}], RepeatSchedule((40,), 3, "all"), 10)
    assert not covering_records([{"seeds": 29, "node_rank": 0, "num_nodes": 1}], RepeatSchedule((40,), 3, "all"), 10)
    one = {"repeat_mode": "all", "repeats": 1, "epochs": 8, "node_rank": 0, "num_nodes": 1}
    assert covering_records([one], RepeatSchedule((40,), 1, "deit"), 8)  # one repeat: the same pairs


@pytest.mark.parametrize("repeats", [2, 3, 4])
@pytest.mark.parametrize("shards", [(100,), (64, 36), (10, 10, 7), (1000, 1000)])
def test_every_image_is_taken_as_often_as_any_other_give_or_take_one(shards, repeats):
    """Each shard is a ring that goes on where it stopped: a set of one shard (or a few) does not
    train on the same ceil(N / R) images every epoch (schedule 1 did), and over E epochs every
    image is selected floor or ceil of its shard's share of E x ceil(N / R)."""
    schedule = RepeatSchedule(shards, repeats)
    epochs = 3 * repeats + 1
    seen, previous = collections.Counter(), None
    for epoch in range(epochs):
        pairs, _ = dealt_pairs(schedule, 8, epoch, 2, 1)
        chosen = {(s, i) for items in pairs.values() for s, i, _ in items}
        seen.update(chosen)
        if len(shards) == 1:  # each epoch takes other images than the one before
            assert chosen != previous
        previous = chosen
    for s, n in enumerate(shards):
        counts = [seen[(s, i)] for i in range(n)]
        assert max(counts) - min(counts) <= 1, (s, collections.Counter(counts))
        assert sum(counts) == schedule.labels_in_shard(s, epochs) // repeats
    if len(shards) == 1:
        assert min(seen.values()) >= epochs // repeats  # every image, about E / R times


def test_schedules_recorded_before_the_ring_are_not_the_same_pairs():
    """Labels precomputed for schedule 1 (no "schedule" recorded) do not cover a schedule-2 run of
    R > 1; with one repeat every schedule asks for the same pairs."""
    from shards.schedule import SCHEDULE_VERSION

    now = RepeatSchedule((9, 7), 3).describe()
    assert now == {"repeat_mode": "deit", "repeats": 3, "schedule": SCHEDULE_VERSION} and SCHEDULE_VERSION == 2
    assert same_pairs(now, dict(now)) and not same_pairs(now, {"repeat_mode": "deit", "repeats": 3})
    assert same_pairs(RepeatSchedule((9, 7), 1).describe(), {"repeat_mode": "all", "repeats": 1})
    assert RepeatSchedule((9, 7), 3, "all").describe() == {"repeat_mode": "all", "repeats": 3}
