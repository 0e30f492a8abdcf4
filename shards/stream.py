"""Streaming reader over webdataset shards for DDP training, precompute and evaluation.

Why not `split_by_node` + `split_by_worker` on shard lists alone: with uneven shards, ranks get
different numbers of batches and DDP hangs at the first collective the short rank never joins.
Here every epoch is an explicit plan computed identically on every rank from the manifest and
the seed schedule (`schedule.py`, which says which images an epoch trains on and their seeds):

- `deit` schedule (the default, `plan_dealt`): the epoch's (image, repeat) positions are its
  selected images in the schedule's order, each R times in a row; rank r takes positions
  r, r + W, ... (DeiT's dealing), so an image's R crops land on different ranks;
- `all` schedule (`plan_epoch`): the epoch's order is the shard order shuffled by (seed, epoch),
  each image repeated R times, and rank r takes a contiguous slice of it;
- either way every rank has the same number of batches (`batches_per_rank`), with batch sizes
  fixed in advance;
- the rank's batches are cut into contiguous blocks, one per data-loader worker, so a worker opens
  only the shards its block touches (webdataset's node/worker split, at position granularity);
- within a worker, samples pass a seeded shuffle buffer (webdataset's `shuffle`).

So every (image, repeat) the epoch selects is seen exactly once, and the batch count is equal on
all ranks by construction. A worker reads only the images of its own positions, each with one
seek, through the split's member index (`index.py`; shards built without one are refused with the
command that writes it).

A corrupt or undecodable sample is skipped, counted and logged; its slot in the batch is filled
with another sample of the same worker so the batch count never changes.
"""

from __future__ import annotations

import bisect
import logging
import multiprocessing
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from .augment import AugmentPolicy, augment, cut_crop, draw_for_device_decode, eval_view
from .decode import decode_image
from .device_decode import is_jpeg
from .index import SplitIndex
from .manifest import Manifest
from .members import IMAGE_KEYS, OpenFiles, ShardChanged
from .plan import BatchPlan
from .render import render_batch, render_items
from .schedule import Piece, RepeatSchedule

log = logging.getLogger(__name__)


@dataclass
class RawSample:
    key: str
    label: int
    data: bytes
    shard: str


class SkipCounter:
    """A webdataset error handler that logs and counts instead of crashing."""

    def __init__(self):
        self.count = 0

    def __call__(self, exn: BaseException, samples: int = 1) -> bool:
        """Count `samples` skipped (more than one for a shard cut short) and log why, once."""
        self.count += samples
        log.warning("skipping %s: %s", "unreadable sample" if samples == 1 else f"{samples} samples", exn)
        return True


def iter_shard(path: str | Path, handler: SkipCounter) -> Iterator[RawSample]:
    """Samples of one shard in stored order; members that cannot be read are skipped and counted."""
    for s in wds.tarfile_samples([{"url": str(path)}], handler=handler):
        try:
            ext = next(k for k in IMAGE_KEYS if k in s)
            label = int(s["cls"])
        except (StopIteration, KeyError, ValueError) as e:
            handler(ValueError(f"sample {s.get('__key__')} in {path} lacks an image or class: {e!r}"))
            continue
        yield RawSample(s["__key__"], label, s[ext], Path(path).name)


def batch_sizes(n: int, num_batches: int, batch_size: int) -> list[int]:
    """n samples cut into exactly num_batches batches of <= batch_size, full batches first."""
    if num_batches == 0:
        return []
    if not num_batches <= n <= num_batches * batch_size:
        raise ValueError(f"{n} samples do not fit {num_batches} batches of <= {batch_size}")
    sizes = [batch_size] * (num_batches - 1) + [n - batch_size * (num_batches - 1)]
    if sizes[-1] <= 0:  # the rank is one batch short: split the last full batch in two
        sizes = [batch_size] * (num_batches - 1) + [0]
        deficit = batch_size * (num_batches - 1) - n
        i = len(sizes) - 2
        sizes[-1] = (batch_size - deficit) // 2
        sizes[i] = batch_size - deficit - sizes[-1]
    assert sum(sizes) == n and all(0 < s <= batch_size for s in sizes), (n, num_batches, sizes)
    return sizes


@dataclass(frozen=True)
class EpochPlan:
    """Which positions of the epoch's order a (rank, worker) reads, and its batch sizes."""

    order: list[int]  # shard indices in this epoch's order
    offsets: list[int]  # cumulative position offsets of `order`, with repeats
    start: int
    sizes: list[int]

    @property
    def stop(self) -> int:
        return self.start + sum(self.sizes)


@dataclass(frozen=True)
class Share:
    """Whose part of an epoch a plan is: a DDP rank's, and one of its data-loader workers'."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    def block(self, num_batches: int) -> tuple[int, int]:
        """The contiguous block [b0, b1) of the rank's batches that this worker makes."""
        return num_batches * self.worker // self.num_workers, num_batches * (self.worker + 1) // self.num_workers


def plan_epoch(
    shard_samples: list[int],
    batch_size: int,
    epoch: int,
    share: Share = Share(),
    repeats: int = 1,
    shuffle: bool = True,
    seed: int = 0,
) -> EpochPlan:
    order = list(range(len(shard_samples)))
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    offsets = [0]
    for i in order:
        offsets.append(offsets[-1] + shard_samples[i] * repeats)
    total = offsets[-1]
    nb = batches_per_rank(sum(shard_samples), batch_size, share.world_size, repeats)
    # Contiguous, near-equal rank slices; each slice has at least nb samples, so nb batches.
    lo = total * share.rank // share.world_size
    hi = total * (share.rank + 1) // share.world_size
    sizes = batch_sizes(hi - lo, nb, batch_size)
    b0, b1 = share.block(nb)
    start = lo + sum(sizes[:b0])
    return EpochPlan(order=order, offsets=offsets, start=start, sizes=sizes[b0:b1])


@dataclass(frozen=True)
class DealtPlan:
    """A (rank, worker)'s share of a `deit`-schedule epoch. The epoch is a list of positions
    p = 0 .. T-1, p = R * j + q for the j-th selected image and its repeat q; rank r takes
    positions r, r + W, r + 2W, ... (DeiT's dealing: an image's R crops on consecutive ranks),
    and a worker takes the rank's positions t = first .. first + sum(sizes) - 1 (p = r + W t)."""

    pieces: list[Piece]  # the epoch's images, in order
    offsets: list[int]  # image offset of each piece in the epoch's order
    rank: int
    world_size: int
    first: int
    sizes: list[int]

    def position_range(self) -> tuple[int, int]:
        """The worker's first and last position (inclusive)."""
        n = sum(self.sizes)
        return self.rank + self.world_size * self.first, self.rank + self.world_size * (self.first + n - 1)


def plan_dealt(schedule: RepeatSchedule, batch_size: int, epoch: int, share: Share = Share()) -> DealtPlan:
    total = schedule.samples_per_epoch
    nb = batches_per_rank(total, batch_size, share.world_size)
    mine = len(range(share.rank, total, share.world_size))  # ranks differ by one position at most
    sizes = batch_sizes(mine, nb, batch_size)
    b0, b1 = share.block(nb)
    pieces = schedule.pieces(epoch)
    offsets = [0]
    for piece in pieces[:-1]:
        offsets.append(offsets[-1] + piece.count)
    return DealtPlan(pieces, offsets, share.rank, share.world_size, sum(sizes[:b0]), sizes[b0:b1])


def batches_per_rank(num_samples: int, batch_size: int, world_size: int, repeats: int = 1) -> int:
    """The same on every rank: ceil(largest rank slice / batch size)."""
    total = num_samples * repeats
    if total < world_size:
        raise ValueError(f"{num_samples} samples x {repeats} repeats cannot feed {world_size} ranks")
    largest = -(-total // world_size)
    nb = -(-largest // batch_size)
    if total // world_size < nb:
        raise ValueError(f"too few samples ({total}) for {world_size} ranks x {nb} batches")
    return nb


@dataclass(frozen=True)
class StreamOptions:
    """How a ShardStream reads its split: `mode` "train" (augment with the seed schedule) or "eval"
    (the eval transform); this process's share (`rank` of `world_size`); DeiT's repeated
    augmentation (`repeats`, `repeat_mode`: schedule.py); the shuffle (None: on in train) of a
    buffer of `shuffle_buffer` images a worker, seeded by `seed`; and whether a torch policy's
    train batches are rendered on the device (`render_on_device`: batches carry Regions)."""

    mode: str = "train"
    rank: int = 0
    world_size: int = 1
    repeats: int = 1
    repeat_mode: str = "deit"
    shuffle: bool | None = None
    shuffle_buffer: int = 1000
    seed: int = 0
    render_on_device: bool = False

    def __post_init__(self):
        if self.mode not in ("train", "eval"):
            raise ValueError(f"mode must be train or eval, not {self.mode!r}")


class ShardStream(IterableDataset):
    """Batches of (image, label, key, seed) from a split; use with DataLoader(batch_size=None).

    mode "train": augment(image, key, seed) with the seed schedule; "eval": the eval transform
    (`StreamOptions`). Call `set_epoch(e)` before each epoch (as with DistributedSampler).
    """

    def __init__(
        self,
        directory: str | Path,
        split: str,
        policy: AugmentPolicy,
        batch_size: int,
        options: StreamOptions | None = None,
        manifest: Manifest | None = None,
    ):
        o = options or StreamOptions()
        if o.render_on_device and policy.renderer != "torch":
            raise ValueError("render_on_device needs the torch renderer (renderer='torch')")
        if o.mode == "train" and policy.decoder == "nvjpeg" and not o.render_on_device:
            raise ValueError(
                "the policy decodes with nvJPEG on the CUDA device that renders: stream it with "
                "render_on_device=True (the trainer does on a CUDA machine)"
            )
        self.directory = Path(directory)
        self.manifest = manifest or Manifest.load(directory)  # the caller's, when it has one
        self.shards = self.manifest.shards(split)
        self.split = split
        # where each image is (checked here, once per process tree): workers read the images
        # their positions need with a seek each
        self.index = SplitIndex.load(directory, split, self.manifest)
        self.policy = policy
        self.batch_size = batch_size
        self.mode = o.mode
        self.rank = o.rank
        self.world_size = o.world_size
        self.repeats = o.repeats if o.mode == "train" else 1
        # train: DeiT's repeated augmentation ("deit") or every image R times ("all"); schedule.py
        self.schedule = RepeatSchedule(
            tuple(s.samples for s in self.shards), self.repeats, o.repeat_mode if o.mode == "train" else "all"
        )
        self.shuffle = (o.mode == "train") if o.shuffle is None else o.shuffle
        self.shuffle_buffer = o.shuffle_buffer
        self.seed = o.seed
        # a torch policy's train batches carry Regions (uint8 crops and their plan) or, for
        # nvJPEG, EncodedRegions as their "image"; `images_on_device(batch, policy, device)` draws the
        # pixels where the model runs
        self.render_on_device = o.render_on_device and o.mode == "train"
        # shared with the data loader's persistent workers, which keep the copy made at their start
        self._epoch = multiprocessing.RawValue("q", 0)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating an epoch (before `iter(loader)`), as with DistributedSampler."""
        self._epoch.value = epoch

    def __len__(self) -> int:
        return batches_per_rank(self.schedule.samples_per_epoch, self.batch_size, self.world_size)

    @property
    def dealt(self) -> bool:
        """Whether epochs follow DeiT's repeated augmentation (`plan_dealt`), else `plan_epoch`."""
        return self.schedule.mode == "deit"

    def plan(self, worker: int, num_workers: int) -> EpochPlan | DealtPlan:
        share = Share(self.rank, self.world_size, worker, num_workers)
        if self.dealt:
            return plan_dealt(self.schedule, self.batch_size, self.epoch, share)
        shard_samples = [s.samples for s in self.shards]
        return plan_epoch(shard_samples, self.batch_size, self.epoch, share, self.repeats, self.shuffle, self.seed)

    def _wanted_all(self, plan: EpochPlan) -> Iterator[tuple[int, dict[int, list[int]]]]:
        """(shard, {image: [repeat, ...]}) of every position in [plan.start, plan.stop) of an `all` plan."""
        repeats = self.repeats
        first = bisect.bisect_right(plan.offsets, plan.start) - 1
        for j in range(first, len(plan.order)):
            base = plan.offsets[j]
            if base >= plan.stop:
                break
            s, wanted = plan.order[j], {}
            lo, hi = max(plan.start - base, 0), min(plan.stop - base, self.shards[s].samples * repeats)
            for p in range(lo, hi):
                wanted.setdefault(p // repeats, []).append(p % repeats)
            yield s, wanted

    def _wanted_dealt(self, plan: DealtPlan) -> Iterator[tuple[int, dict[int, list[int]]]]:
        """(shard, {image: [repeat, ...]}) of every position of a `deit` plan, in the epoch's order."""
        repeats, world, rank = self.repeats, plan.world_size, plan.rank
        p_lo, p_hi = plan.position_range()
        for piece, base in zip(plan.pieces, plan.offsets, strict=True):
            s, n = piece.shard, self.schedule.shard_samples[piece.shard]
            lo, hi = max(base * repeats, p_lo), min((base + piece.count) * repeats, p_hi + 1)
            if hi <= lo:
                if base * repeats > p_hi:
                    break
                continue
            wanted = {}
            for p in range(lo + (rank - lo) % world, hi, world):  # this worker's positions in the piece
                wanted.setdefault(piece.image(p // repeats - base, n), []).append(p % repeats)
            yield s, wanted

    def _read(self, wanted, skips: SkipCounter, files: OpenFiles) -> Iterator[tuple[RawSample, int]]:
        """(raw sample, seed) of each wanted (shard, {image: [repeat, ...]}). An image that cannot be
        read (a shard cut short, a member past a truncated file) costs its positions, counted as
        skipped with the first reason."""
        for s, repeats in wanted:
            lost, reason = 0, None
            for i, raw in self._images(s, sorted(repeats), skips, files):
                if isinstance(raw, Exception):
                    lost, reason = lost + len(repeats[i]), reason or raw
                    continue
                for q in repeats[i]:
                    yield raw, self.schedule.seed(s, i, self.epoch, q)
            if lost:
                skips(reason, samples=lost)

    def _images(self, s: int, wanted: list[int], skips: SkipCounter, files: OpenFiles):
        """(i, raw sample or the exception that lost it) for the images `wanted` of shard `s`, in
        order, by a seek each through the member index."""
        shard = self.shards[s]
        rows = self.index.shard_rows(s)
        for i in wanted:
            r = rows.start + i
            try:
                if self.index.label[r] < 0:
                    raise ValueError(f"sample {self.index.key(r)} in {shard.name} has no class")
                data = self.index.member(r).read(files)
            except ShardChanged:  # not an unreadable image: another image's bytes under this key
                raise
            except (OSError, ValueError) as e:
                yield i, e
                continue
            yield i, RawSample(self.index.key(r), int(self.index.label[r]), data, shard.name)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        plan = self.plan(worker, num_workers)
        if not plan.sizes:
            return
        skips, files = SkipCounter(), OpenFiles()
        wanted = self._wanted_dealt(plan) if self.dealt else self._wanted_all(plan)
        stream = self._read(wanted, skips, files)
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(f"buffer:{self.seed}:{self.epoch}:{self.rank}:{worker}")
            stream = wds.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(stream)
        samples = self._decoded(stream, skips)
        last = None
        for size in plan.sizes:
            batch = []
            reported = skips.count
            for item in samples:
                batch.append(item)
                if len(batch) == size:
                    break
            if batch:
                last = batch[-1]
            elif last is None:
                raise RuntimeError(f"no readable sample in the shards of rank {self.rank} worker {worker}")
            while len(batch) < size:  # skipped samples: keep the batch count, reuse a good sample
                batch.append(last)
            yield collate(batch, skipped=skips.count - reported, policy=self.policy)
        files.close()

    def _decoded(self, stream, skips: SkipCounter):
        encoded = self.render_on_device and self.policy.decoder == "nvjpeg"  # JPEGs decode on the GPU
        for raw, seed in stream:
            try:
                if encoded and is_jpeg(raw.data):
                    yield draw_for_device_decode(raw.data, raw.key, seed, self.policy), raw.label, raw.key, seed
                    continue
                image = decode_image(raw.data)
            except ValueError as e:  # a corrupt image must not kill an epoch
                skips(ValueError(f"{raw.key} in {raw.shard}: {e}"))
                continue
            # Augmentation errors are bugs, not bad data: let them raise.
            if self.render_on_device:
                yield cut_crop(image, raw.key, seed, self.policy), raw.label, raw.key, seed
            elif self.mode == "train":
                yield augment(image, raw.key, seed, self.policy), raw.label, raw.key, seed
            else:
                yield eval_view(image, self.policy), raw.label, raw.key, -1


@dataclass
class Regions:
    """A batch still to render on the device: each crop's uint8 region, cut and resized in the loader
    worker, and the batch's drawn parameters packed in one tensor. Two buffers cross the loader,
    one copy each; `render` draws the pixels on the device (no host sync)."""

    crops: torch.Tensor  # uint8 [B, 3, S, S]
    plan: BatchPlan

    def on_device(self, policy: AugmentPolicy, device: torch.device) -> torch.Tensor:
        return render_batch(self.crops, self.plan, policy, device)

    def pin_memory(self) -> Regions:  # DataLoader(pin_memory=True) calls it
        plan = BatchPlan(self.plan.packed.pin_memory(), self.plan.fields, self.plan.size)
        return Regions(self.crops.pin_memory(), plan)

    def __len__(self) -> int:
        return len(self.crops)


@dataclass
class EncodedRegions:
    """A batch whose JPEGs stay encoded for the device's decoder (an nvJPEG policy): each crop's
    bytes (or its uint8 region, for an image that is not a JPEG) and its drawn parameters."""

    sources: list  # JPEG bytes or uint8 [3, S, S]
    params: list
    keys: list | None = None  # named by an image the device cannot decode

    def on_device(self, policy: AugmentPolicy, device: torch.device) -> torch.Tensor:
        return render_items(list(zip(self.sources, self.params)), policy, device, self.keys)

    def __len__(self) -> int:
        return len(self.sources)


def collate(items: list, skipped: int = 0, policy: AugmentPolicy | None = None) -> dict:
    """A batch: `image` is the crops (float [B, 3, S, S]), or what renders them on the device:
    Regions / EncodedRegions (`images_on_device` tells them apart by type)."""
    xs, labels, keys, seeds = zip(*items)
    if isinstance(xs[0], tuple):  # (uint8 crop or JPEG bytes, params) to render on the device: `images_on_device`
        sources, params = zip(*xs)
        if all(isinstance(s, torch.Tensor) for s in sources):
            image = Regions(torch.stack(sources), BatchPlan.build(list(params), policy))
        else:
            image = EncodedRegions(list(sources), list(params), list(keys))
    else:
        image = torch.stack(xs)
    return {
        "image": image,
        "label": torch.tensor(labels, dtype=torch.long),
        "key": list(keys),
        "seed": torch.tensor(seeds, dtype=torch.long),
        "skipped": skipped,
    }


def images_on_device(batch: dict, policy: AugmentPolicy, device: torch.device) -> torch.Tensor:
    """The batch's crops on `device`: copied there, or rendered there from the Regions (or
    EncodedRegions) a `render_on_device` stream sends (the same tensors the workers would render)."""
    image = batch["image"]
    if isinstance(image, torch.Tensor):
        return image.to(device, non_blocking=True)
    return image.on_device(policy, device)


def make_loader(stream, num_workers: int = 2, pin_memory: bool = False, prefetch_factor: int = 4):
    """A DataLoader over a ShardStream (batching happens in the workers). Workers persist across
    epochs (no start-up per epoch); they see `set_epoch` through the stream's shared epoch."""
    kw = dict(batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
    if num_workers > 0:
        kw.update(prefetch_factor=prefetch_factor, persistent_workers=True)
    return torch.utils.data.DataLoader(stream, **kw)
