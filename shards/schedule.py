"""The seed schedule: which (image, repeat) pairs an epoch trains on, and each pair's augmentation
seed. The contract between precompute (which labels to make) and the trainer (which it asks for).

Two repeat modes, R = `--repeated-aug`:

- `deit` (the default): DeiT's repeated augmentation (its `RASampler`). Epoch e takes the first
  ceil(N / R) images of an order that is a function of the epoch alone (not of the run seed, not
  of the world size), each R times: about N samples an epoch, every image seen about once an
  epoch on average, R crops at a time. The R crops of an image are dealt to consecutive ranks
  (position p goes to rank p mod W), as DeiT deals them. The epoch's order is its shard order
  (shuffled by the epoch) with the images of a shard in stored order, so selecting the first
  images selects whole shards plus the first images of one more; shards are built in a shuffled
  order, so a shard is a random sample of the data set.
- `all`: every image R times in every epoch (R x N samples an epoch); this project's schedule
  before `deit`, kept for labels made for it.

Seeds are numbered per image so that label rows stay dense: the c-th time an image is selected
(c = 0, 1, ...), its R crops get seeds c*R .. c*R + R-1. A run of E epochs asks image i for seeds
0 .. K_i*R - 1, where K_i is how many of the E epochs selected it (about E / R): about E x N
labels in all. In `all` mode an image is selected in every epoch, so its seeds are e*R + r, as
they always were. With R = 1 the two modes ask for the same pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

REPEAT_MODES = ("deit", "all")


@dataclass(frozen=True)
class Selection:
    """Epoch e's images in order: whole shards `full`, then the first `partial_count` images of
    shard `partial` (if any), each taken `repeats` times in a row."""

    full: tuple[int, ...]
    partial: int | None
    partial_count: int


@dataclass(frozen=True)
class RepeatSchedule:
    """The schedule of one split: `shard_samples` are its shards' image counts, in manifest order."""

    shard_samples: tuple[int, ...]
    repeats: int = 1
    mode: str = "deit"

    def __post_init__(self):
        if self.mode not in REPEAT_MODES:
            raise ValueError(f"repeat mode must be one of {REPEAT_MODES}, not {self.mode!r}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, not {self.repeats}")

    @property
    def num_images(self) -> int:
        return sum(self.shard_samples)

    @property
    def images_per_epoch(self) -> int:
        """Distinct images an epoch trains on."""
        n = self.num_images
        return n if self.mode == "all" else -(-n // self.repeats)

    @property
    def samples_per_epoch(self) -> int:
        return self.images_per_epoch * self.repeats

    def shard_order(self, epoch: int) -> list[int]:
        """The `deit` epoch's shard order: a function of the epoch alone."""
        order = list(range(len(self.shard_samples)))
        random.Random(f"repeated-aug:{epoch}").shuffle(order)
        return order

    def pieces(self, epoch: int) -> list[tuple[int, int]]:
        """Epoch `epoch`'s images in order: (shard, images taken from its start), each R times."""
        sel = self.selection(epoch)
        out = [(s, self.shard_samples[s]) for s in sel.full]
        return out + ([(sel.partial, sel.partial_count)] if sel.partial is not None else [])

    def selection(self, epoch: int) -> Selection:
        """The images epoch `epoch` trains on (`deit` mode), in order."""
        if self.mode == "all":
            return Selection(tuple(range(len(self.shard_samples))), None, 0)
        left = self.images_per_epoch
        full: list[int] = []
        for s in self.shard_order(epoch):
            n = self.shard_samples[s]
            if n <= left:
                full.append(s)
                left -= n
            else:
                return Selection(tuple(full), s if left else None, left)
            if left == 0:
                break
        return Selection(tuple(full), None, 0)

    @cached_property
    def _history(self) -> list[tuple[list[int], list[list[int]]]]:
        """Per epoch computed so far: (full selections per shard, partial counts per shard) of the
        epochs before it; grown on demand."""
        return [([0] * len(self.shard_samples), [[] for _ in self.shard_samples])]

    def _before(self, epoch: int) -> tuple[list[int], list[list[int]]]:
        """How often each shard was fully selected in epochs < `epoch`, and the partial counts."""
        history = self._history
        while len(history) <= epoch:
            e = len(history) - 1
            full, partial = history[-1]
            full, partial = list(full), [list(p) for p in partial]
            sel = self.selection(e)
            for s in sel.full:
                full[s] += 1
            if sel.partial is not None:
                partial[sel.partial].append(sel.partial_count)
            history.append((full, partial))
        return history[epoch]

    def times_selected(self, shard: int, index: int, epoch: int) -> int:
        """How many epochs before `epoch` trained on image `index` of `shard`."""
        if self.mode == "all":
            return epoch
        full, partial = self._before(epoch)
        return full[shard] + sum(1 for count in partial[shard] if index < count)

    def seed(self, shard: int, index: int, epoch: int, repeat: int) -> int:
        """The augmentation seed of (image `index` of `shard`, epoch, repeat)."""
        return self.times_selected(shard, index, epoch) * self.repeats + repeat

    def seeds_for_run(self, shard: int, index: int, epochs: int, start_epoch: int = 0) -> range:
        """Every seed a run of epochs [start_epoch, epochs) asks this image for: what precompute
        must label. Contiguous by construction."""
        return range(
            self.times_selected(shard, index, start_epoch) * self.repeats,
            self.times_selected(shard, index, epochs) * self.repeats,
        )

    def seed_limit_for_run(self, epochs: int) -> int:
        """One more than the largest seed a run of `epochs` epochs asks any image for."""
        if self.mode == "all":
            return epochs * self.repeats
        full, partial = self._before(epochs)
        return max((f + len(p) for f, p in zip(full, partial, strict=True)), default=0) * self.repeats

    def labels_in_shard(self, shard: int, epochs: int) -> int:
        """The (image, seed) pairs of one shard a run of `epochs` epochs asks for."""
        n = self.shard_samples[shard]
        if self.mode == "all":
            return epochs * self.repeats * n
        full, partial = self._before(epochs)
        return (full[shard] * n + sum(partial[shard])) * self.repeats

    def labels_for_run(self, epochs: int, start_epoch: int = 0) -> int:
        """The number of (image, seed) pairs a run asks for."""
        return (epochs - start_epoch) * self.samples_per_epoch

    def describe(self) -> dict:
        """What a label namespace records about the schedule its labels were made for."""
        return {"repeat_mode": self.mode, "repeats": self.repeats}


def same_pairs(a: dict, b: dict) -> bool:
    """Whether two recorded schedules ask for the same (image, seed) pairs: the same mode and
    repeats, or one repeat (where the two modes coincide)."""
    if a.get("repeats") != b.get("repeats"):
        return False
    return a.get("repeats") == 1 or a.get("repeat_mode") == b.get("repeat_mode")


__all__ = ["REPEAT_MODES", "RepeatSchedule", "Selection", "same_pairs"]
