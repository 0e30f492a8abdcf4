"""Batch precompute: label every (image, seed) of a shard set into a store, resumably.

The precompute feeder of the label engine (engine.py): the main thread walks the node's shards
through their member index (or their tar headers, without one), asks the store which seeds of
each group of images are missing (one bulk get
per group) and submits the missing (image, seeds) work, blocking while the engine's queue is
full. The engine's workers decode each image once per batch and augment into shared batch
buffers, the teacher runs full batches and the engine's writer stores each batch's labels in one
bulk put. A killed job restarted with the same arguments skips what is stored; what it redoes is
the work that was queued or in flight.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from distill_core import Command, Nested
from labels.namespace import MAX_SEED, RecordFormat
from labels.store import StoreError, open_store, redact
from labels.teacher import Teacher, TeacherSettings
from shards import Manifest, policy_overrides
from shards.fingerprint import FingerprintMismatch, difference, render_fingerprint
from shards.flags import DecoderFlag, RendererFlag, RepeatModeFlag
from shards.index import SplitIndex
from shards.manifest import verify_shard
from shards.schedule import RepeatSchedule

from .engine import EngineConfig, Job, LabelEngine, Result, render_device
from .engine_pool import engine_devices

log = logging.getLogger(__name__)

GROUP = 64  # images per store lookup


def parse_seeds(spec: str) -> range:
    """'A:B' -> range(A, B); 'N' -> range(N, N + 1)."""
    try:
        if ":" in spec:
            a, b = spec.split(":", 1)
            r = range(int(a), int(b))
        else:
            r = range(int(spec), int(spec) + 1)
    except ValueError as e:
        raise ValueError(f"seeds must be A:B or N, got {spec!r}") from e
    if len(r) == 0 or r.start < 0 or r.stop - 1 > MAX_SEED:
        raise ValueError(f"seeds {spec!r} must be a non-empty range within 0..{MAX_SEED}")
    return r


def node_shards(names: list[str], node_rank: int, num_nodes: int) -> list[str]:
    """Shards of one node: every num_nodes-th, so N machines cover a data set without overlap."""
    if not 0 <= node_rank < num_nodes:
        raise ValueError(f"--node-rank must be in 0..{num_nodes - 1}")
    return names[node_rank::num_nodes]


class _Tally:
    """Counts the engine's answers (on its writer thread) for the progress bar and the summary;
    remembers the first failure, which the feeder raises."""

    def __init__(self, bar):
        self.bar = bar
        self.lock = threading.Lock()
        self.computed = 0
        self.skipped = 0
        self.first: tuple[float, int] | None = None  # (time, labels) when the first answer was stored
        self.last = 0.0  # time of the latest answer
        self.error: BaseException | None = None

    def __call__(self, outcome: Result | BaseException) -> None:
        with self.lock:
            if isinstance(outcome, BaseException):
                self.error = self.error or outcome
                return
            if not outcome.stored:
                self.error = self.error or StoreError(
                    "labels could not be stored (see the warning above); run the same command again to resume"
                )
            bad = sum(e is not None for e in outcome.errors)
            for e in outcome.errors:
                if e is not None:
                    log.warning("skipping unreadable sample: %s", e)
                    break
            self.skipped += bad
            self.computed += len(outcome.errors) - bad
            self.last = time.perf_counter()
            if self.first is None:
                self.first = (self.last, self.computed)
        self.bar.update(len(outcome.errors))

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def precompute(
    shards: str,
    seeds: range | RepeatSchedule,
    store_url: str,
    teacher: Teacher | list[Teacher],
    split: str = "train",
    fmt: RecordFormat = RecordFormat(),
    policy_overrides: dict | None = None,
    batch_size: int = 256,
    workers: int = 2,
    node_rank: int = 0,
    num_nodes: int = 1,
    progress: bool = True,
    verify: bool = True,
    epochs: int | None = None,
    startup: dict | None = None,
) -> dict:
    """Label every (image, seed) of this node's shards; returns the summary, whose `ok` is False
    when any label could not be made (a shard that does not match its manifest entry, a shard cut
    short, an unreadable image): those labels are counted in `labels_skipped`, never as done.
    Several teachers (one per device, the same weights): one engine each, fed by queue depth.
    `seeds`: one range for every image, or a RepeatSchedule with `epochs`: each image's seeds
    for a run of that many epochs (about epochs x N labels with DeiT's schedule). `startup`: seconds
    of start-up the caller spent (the teachers' loading), reported with the job's own phases."""
    t0 = time.perf_counter()
    phases = dict(startup or {})

    def phase(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = round(phases.get(name, 0.0) + now - since, 3)
        return now

    teachers = teacher if isinstance(teacher, list) else [teacher]
    teacher = teachers[0]
    if len({t.teacher_id for t in teachers}) != 1:
        raise ValueError("every device must run the same teacher")
    directory = Path(shards)
    manifest = Manifest.load(directory)
    policy = manifest.policy(**(policy_overrides or {}))
    ns = teacher.namespace(policy.policy_id, fmt, manifest.classes)
    split_shards = manifest.shards(split)
    if isinstance(seeds, RepeatSchedule):
        if epochs is None or tuple(s.samples for s in split_shards) != seeds.shard_samples:
            raise ValueError("a schedule needs its epochs and must be made for this split's shards")
        schedule, seed_limit = seeds, seeds.seed_limit_for_run(epochs)

        def seeds_of(shard: int, image: int) -> range:
            return schedule.seeds_for_run(shard, image, epochs)

        def labels_in(shard: int) -> int:
            return schedule.labels_in_shard(shard, epochs)
    else:
        seed_limit = seeds.stop

        def seeds_of(shard: int, image: int) -> range:
            return seeds

        def labels_in(shard: int) -> int:
            return split_shards[shard].samples * len(seeds)

    # where each image is (shards without an index are refused, with the command that writes it)
    at = time.perf_counter()
    index = SplitIndex.load(directory, split, manifest)
    at = phase("index", at)
    # creates the namespace (serving at least these seeds) before the engine's writer opens it
    store = open_store(store_url, ns, seed_limit=seed_limit)
    at = phase("store", at)
    fingerprint = claim_fingerprint(store, directory, policy, [t.device for t in teachers], split, "precompute")
    at = phase("fingerprint", at)
    mine = node_shards([s.name for s in split_shards], node_rank, num_nodes)
    index_of = {s.name: i for i, s in enumerate(split_shards)}
    info = {s.name: s for s in split_shards}
    # Room for two groups of images: the feeder looks up and submits the next group while the
    # engine works through the last one, so neither the workers nor the teacher wait for it.
    config = EngineConfig(
        max_batch_size=batch_size,
        max_queue_delay_ms=50.0,
        max_queue_size=max(4 * batch_size, 2 * GROUP * max((len(seeds_of(index_of[n], 0)) for n in mine), default=1)),
        workers=workers,
    )
    totals = {"images": 0, "present": 0, "skipped": 0}
    damaged: list[str] = []
    with tqdm(
        total=sum(labels_in(index_of[name]) for name in mine),
        desc=f"precompute node {node_rank}/{num_nodes}",
        unit="label",
        disable=not progress,
        smoothing=0.05,
    ) as bar:
        tally = _Tally(bar)
        with contextlib.ExitStack() as stack:
            at = time.perf_counter()
            engines = [
                stack.enter_context(LabelEngine(t, policy, fmt, config, store_url=store_url, namespace=ns))
                for t in teachers
            ]
            phase("spawn", at)  # the engines' workers started, their buffers page-locked

            def feed(group: list) -> None:
                """group: (key, member, seeds) per image; one store lookup for all their pairs."""
                keys = [k for k, _, seeds in group for _ in seeds]
                have = store.get(keys, [s for _, _, seeds in group for s in seeds]).present
                present = int(have.sum())
                totals["present"] += present
                bar.update(present)
                jobs, at = [], 0
                for key, member, seeds in group:
                    row, at = have[at : at + len(seeds)], at + len(seeds)
                    if not row.all():
                        jobs.append(Job(member, key, tuple(s for s, h in zip(seeds, row) if not h)))
                if jobs:  # to the engine with the shortest queue; it blocks while that one is full
                    min(engines, key=lambda e: e.depth).submit(jobs, tally, block=True)
                tally.check()

            for name in mine:
                shard, s = info[name], index_of[name]
                totals["images"] += shard.samples
                at = time.perf_counter()
                problem = verify_shard(directory, shard) if verify else None
                phase("verify", at)
                if problem:  # its images may not be the ones the keys name: label none of them
                    log.error("%s; its %d images are not labeled", problem, shard.samples)
                    damaged.append(name)
                    totals["skipped"] += labels_in(s)
                    bar.update(labels_in(s))
                    continue
                group = []
                for count, (key, member) in enumerate(index.members(s)):
                    group.append((key, member, seeds_of(s, count)))
                    if len(group) == GROUP:
                        feed(group)
                        group = []
                if group:
                    feed(group)
        tally.check()  # every label is stored before the summary says so
    ok = not damaged and totals["skipped"] + tally.skipped == 0
    if ok:  # what the trainer checks a run's schedule against (this node's part of it)
        what = {**seeds.describe(), "epochs": epochs} if isinstance(seeds, RepeatSchedule) else None
        if what is None and seeds.start == 0:
            what = {"seeds": seeds.stop}
        if what is not None:
            store.record_coverage({**what, "node_rank": node_rank, "num_nodes": num_nodes})
    end = time.perf_counter()
    dt = end - t0
    first = tally.first
    # steady: from the first stored answer to the last, without start-up and shut-down
    steady = (tally.computed - first[1]) / (tally.last - first[0]) if first and tally.computed > first[1] else None
    if first:
        phases["first_label"] = round(first[0] - t0, 3)  # from the call, the phases above included
    store.close()
    return {
        "store": redact(store_url),
        "namespace": ns.id,
        "teacher": teacher.teacher_id,
        "policy_id": policy.policy_id,
        "fingerprint": fingerprint["sha256"],
        "format": fmt.name,
        "split": split,
        **(
            {"seeds": f"0:{seed_limit}", "epochs": epochs, **seeds.describe()}
            if isinstance(seeds, RepeatSchedule)
            else {"seeds": f"{seeds.start}:{seeds.stop}"}
        ),
        "node_rank": node_rank,
        "num_nodes": num_nodes,
        "shards": len(mine),
        "ok": ok,
        "shards_damaged": damaged,
        "images": totals["images"],
        "labels_present": totals["present"],
        "labels_computed": tally.computed,
        "devices": [str(t.device) for t in teachers],
        "labels_per_device": [int(e.metrics.inference_count.labels(e.device)._value.get()) for e in engines],
        "labels_skipped": totals["skipped"] + tally.skipped,
        "seconds": round(dt, 3),
        "labels_per_s": round(tally.computed / dt, 1) if dt else None,
        "steady_labels_per_s": round(steady, 1) if steady else None,
        # seconds: model (the teachers' loading), store, fingerprint, index, spawn (the engines),
        # verify (every shard's sha256, as it is reached), first_label (from the start)
        "startup_s": phases,
    }


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


class PrecomputeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _one_seed_source(self) -> PrecomputeConfig:
        if (self.seeds is None) == (self.epochs is None):
            raise ValueError("give exactly one of --seeds A:B and --epochs E (with --repeated-aug, --repeat-mode)")
        return self

    shards: str = Field(description="shard directory (with manifest.json)")
    seeds: str | None = Field(
        None, description="a seed range A:B for every image; or give the run's schedule: --epochs (and --repeated-aug)"
    )
    epochs: int | None = Field(
        None, ge=1, description="label exactly what a run of this many epochs asks for (its schedule, below)"
    )
    repeated_aug: int = Field(3, ge=1, description="the run's repeated augmentation (with --epochs)")
    repeat_mode: RepeatModeFlag = "deit"
    split: str = Field("train", description="split of --shards to label")
    store: str = Field("runs/labels.db", description="label store URL (a file path, file://, redis://, rediss://)")
    format: str = Field("top1", description="record format: top1 (hard labels) or topKp, e.g. top5p")
    policy: dict = Field(default_factory=dict, description="JSON of augmentation policy overrides (as the trainer's)")
    renderer: RendererFlag = None
    decoder: DecoderFlag = None
    batch_size: int = Field(256, ge=1, description="crops per teacher batch")
    workers: int = Field(2, ge=1, description="decode/augment worker processes")
    node_rank: int = Field(0, ge=0, description="this machine's index when N machines split the shards")
    num_nodes: int = Field(1, ge=1, description="machines splitting the shards (each takes every N-th shard)")
    device: str = Field("auto", description="teacher device: auto | cpu | cuda | cuda:N")
    devices: str | None = Field(
        None,
        description="one label engine per device, in one job, fed by queue depth: a comma list "
        "(cuda:0,cuda:1) or auto (every visible GPU); replaces --device; --workers is per device",
    )
    verify: bool = Field(True, description="check each shard's size and sha256 against the manifest before labeling it")
    progress: bool = Field(True, description="progress bar")
    teacher: Annotated[TeacherSettings, Nested(title="teacher")] = Field(
        default_factory=TeacherSettings, description="the teacher"
    )


def run_precompute(cfg: PrecomputeConfig) -> tuple[dict, int]:
    """The summary, and exit code 1 when it is not ok (labels missing: see the errors logged)."""
    if cfg.epochs is not None:
        split = Manifest.load(cfg.shards).shards(cfg.split)
        seeds = RepeatSchedule(tuple(s.samples for s in split), cfg.repeated_aug, cfg.repeat_mode)
    else:
        seeds = parse_seeds(cfg.seeds)
    t0 = time.perf_counter()
    teachers = [Teacher(cfg.teacher, device=d) for d in (engine_devices(cfg.devices) if cfg.devices else [cfg.device])]
    summary = precompute(
        cfg.shards,
        seeds,
        cfg.store,
        teachers,
        split=cfg.split,
        fmt=RecordFormat.parse(cfg.format),
        policy_overrides=policy_overrides(cfg.policy, cfg.renderer, cfg.decoder),
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        node_rank=cfg.node_rank,
        num_nodes=cfg.num_nodes,
        progress=cfg.progress,
        verify=cfg.verify,
        epochs=cfg.epochs,
        startup={"model": round(time.perf_counter() - t0, 3)},
    )
    return summary, 0 if summary["ok"] else 1


COMMAND = Command(
    "precompute",
    help="label every (image, seed) of a shard set into a store (resumable)",
    config=PrecomputeConfig,
    run=run_precompute,
)
