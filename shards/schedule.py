"""The seed schedule: which (image, repeat) pairs an epoch trains on, and each pair's augmentation
seed. The contract between precompute (which labels to make) and the trainer (which it asks for).

Two repeat modes, R = `--repeated-aug`:

- `deit` (the default): DeiT's repeated augmentation (its `RASampler`). Epoch e takes ceil(N / R)
  images, each R times: about N samples an epoch, every image seen about once an epoch on
  average, R crops at a time. Which images is a function of the epoch alone (not of the run seed,
  not of the world size). The R crops of an image are dealt to consecutive ranks (position p goes
  to rank p mod W), as DeiT deals them. The epoch walks its shards in an order shuffled by the
  epoch; each shard is read as a ring that goes on where the previous epoch that read it stopped,
  so the epoch takes whole shards plus the next images of one more, and over epochs every image
  of a shard is taken as often as any other, give or take one (schedule 2). Shards are built in
  a shuffled order, so a shard is a random sample of the data set. Schedule 1 (labels made before
  2026-12-05) took the *first* images of the partial shard every time, so a data set of one shard
  trained on the same ceil(N / R) images every epoch.
- `all`: every image R times in every epoch (R x N samples an epoch); this project's schedule
  before `deit`, kept for labels made for it.

Seeds are numbered per image so that label rows stay dense: the c-th time an image is selected
(c = 0, 1, ...), its R crops get seeds c*R .. c*R + R-1. A run of E epochs asks image i for seeds
0 .. K_i*R - 1, where K_i is how many of the E epochs selected it (about E / R): about E x N
labels in all. In `all` mode an image is selected in every epoch, so its seeds are e*R + r, as
they always were. With R = 1 the two modes (and both `deit` schedules) ask for the same pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

REPEAT_MODES = ("deit", "all")


SCHEDULE_VERSION = 2  # of the `deit` mode: 2 reads each shard as a ring (see the module docstring)


@dataclass(frozen=True)
class Piece:
    """`count` images of shard `shard` in an epoch's order: images start, start + 1, ... of the
    shard, wrapping around to its first image."""

    shard: int
    start: int
    count: int

    def image(self, j: int, num_images: int) -> int:
        """The shard's index of the piece's j-th image (the shard holds `num_images`)."""
        return (self.start + j) % num_images

    def images(self, num_images: int) -> list[int]:
        return [self.image(j, num_images) for j in range(self.count)]


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

    def pieces(self, epoch: int) -> list[Piece]:
        """Epoch `epoch`'s images in order, each R times."""
        taken = self._taken(epoch)
        return [Piece(s, taken[s] % self.shard_samples[s], count) for s, count in self._counts(epoch)]

    def _counts(self, epoch: int) -> list[tuple[int, int]]:
        """(shard, images taken from it) of epoch `epoch`, in order."""
        if self.mode == "all":
            return list(enumerate(self.shard_samples))
        left, out = self.images_per_epoch, []
        for s in self.shard_order(epoch):
            if left == 0:
                break
            count = min(self.shard_samples[s], left)
            out.append((s, count))
            left -= count
        return out

    @cached_property
    def _history(self) -> list[list[int]]:
        """Per epoch computed so far: the images each shard gave the epochs before it; grown on demand."""
        return [[0] * len(self.shard_samples)]

    def _taken(self, epoch: int) -> list[int]:
        """How many images each shard gave the epochs before `epoch` (its ring's position)."""
        history = self._history
        while len(history) <= epoch:
            taken = list(history[-1])
            for s, count in self._counts(len(history) - 1):
                taken[s] += count
            history.append(taken)
        return history[epoch]

    def times_selected(self, shard: int, index: int, epoch: int) -> int:
        """How many epochs before `epoch` trained on image `index` of `shard`: the positions
        p < T of the shard's ring (T images taken) with p mod n == index."""
        if self.mode == "all":
            return epoch
        n = self.shard_samples[shard]
        return (self._taken(epoch)[shard] - index + n - 1) // n

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
        """One more than the largest seed a run of `epochs` epochs asks any image for (a shard's
        first image is taken most often)."""
        if self.mode == "all":
            return epochs * self.repeats
        counts = [-(-t // n) for t, n in zip(self._taken(epochs), self.shard_samples, strict=True)]
        return max(counts, default=0) * self.repeats

    def labels_in_shard(self, shard: int, epochs: int) -> int:
        """The (image, seed) pairs of one shard a run of `epochs` epochs asks for."""
        if self.mode == "all":
            return epochs * self.repeats * self.shard_samples[shard]
        return self._taken(epochs)[shard] * self.repeats

    def labels_for_run(self, epochs: int, start_epoch: int = 0) -> int:
        """The number of (image, seed) pairs a run asks for."""
        return (epochs - start_epoch) * self.samples_per_epoch

    def describe(self) -> dict:
        """What a label namespace records about the schedule its labels were made for."""
        out = {"repeat_mode": self.mode, "repeats": self.repeats}
        return {**out, "schedule": SCHEDULE_VERSION} if self.mode == "deit" else out


def same_pairs(a: dict, b: dict) -> bool:
    """Whether two recorded schedules ask for the same (image, seed) pairs: the same mode, repeats
    and `deit` schedule version (1 where none is recorded), or one repeat (where all coincide)."""
    if a.get("repeats") != b.get("repeats"):
        return False
    if a.get("repeats") == 1:
        return True
    if a.get("repeat_mode") != b.get("repeat_mode"):
        return False
    return a.get("repeat_mode") != "deit" or a.get("schedule", 1) == b.get("schedule", 1)


__all__ = ["REPEAT_MODES", "SCHEDULE_VERSION", "Piece", "RepeatSchedule", "same_pairs"]
