"""Batch precompute: label every (image, seed) of a shard set into a store, resumably.

How it feeds the label engine (`engine/`): the main thread walks the node's shards
through their member index, asks the store which seeds of each group of images are missing (one
bulk get per group) and submits the missing (image, seeds) work, blocking while the engine's
queue is full. The engine's workers decode each image once per batch and augment into shared batch
buffers, the teacher runs full batches and the engine's writer stores each batch's labels in one
bulk put. A killed job restarted with the same arguments skips what is stored; what it redoes is
the work that was queued or in flight.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from distill_core import Command, Nested
from distill_core.secrets import SecretURL
from labels.namespace import MAX_SEED, RecordFormat
from labels.provenance import check_labelled_bytes
from labels.quality import label_quality
from labels.store import StoreError, open_store, redact
from labels.teacher import Teacher, TeacherSettings
from shards import Manifest, policy_overrides
from shards.flags import DecoderFlag, RendererFlag, RepeatModeFlag
from shards.index import SplitIndex
from shards.manifest import verify_shard
from shards.schedule import RepeatSchedule

from .engine.contract import EngineConfig, Job, Result
from .engine.core import LabelEngine, claim_fingerprint
from .engine.processes import engine_devices

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


class LabelPlan(Protocol):
    """What precompute labels: each image's seeds, and what the store records once they are all
    there. Two kinds: one seed range for every image (`SeedRange`, `--seeds A:B`), or what a run
    of E epochs asks for under its repeat schedule (`RunSchedule`, `--epochs E`)."""

    seed_limit: int  # one more than the largest seed of any image

    def check(self, shard_samples: tuple[int, ...]) -> None: ...  # ValueError: not for these shards

    def seeds_of(self, shard: int, image: int) -> range: ...

    def labels_in(self, shard: int, samples: int) -> int: ...  # (image, seed) pairs of a shard

    def coverage(self) -> dict | None: ...  # what the store records when all is labeled

    def describe(self) -> dict: ...  # the summary's fields


@dataclass(frozen=True)
class SeedRange:
    seeds: range

    @property
    def seed_limit(self) -> int:
        return self.seeds.stop

    def check(self, shard_samples: tuple[int, ...]) -> None:
        pass

    def seeds_of(self, shard: int, image: int) -> range:
        return self.seeds

    def labels_in(self, shard: int, samples: int) -> int:
        return samples * len(self.seeds)

    def coverage(self) -> dict | None:
        return {"seeds": self.seeds.stop} if self.seeds.start == 0 else None  # seeds 0..B-1 of every image

    def describe(self) -> dict:
        return {"seeds": f"{self.seeds.start}:{self.seeds.stop}"}


@dataclass(frozen=True)
class RunSchedule:
    schedule: RepeatSchedule
    epochs: int

    @property
    def seed_limit(self) -> int:
        return self.schedule.seed_limit_for_run(self.epochs)

    def check(self, shard_samples: tuple[int, ...]) -> None:
        if tuple(shard_samples) != self.schedule.shard_samples:
            raise ValueError("a schedule must be made for the split's shards (their image counts differ)")

    def seeds_of(self, shard: int, image: int) -> range:
        return self.schedule.seeds_for_run(shard, image, self.epochs)

    def labels_in(self, shard: int, samples: int) -> int:
        return self.schedule.labels_in_shard(shard, self.epochs)

    def coverage(self) -> dict | None:
        return {**self.schedule.describe(), "epochs": self.epochs}

    def describe(self) -> dict:
        return {"seeds": f"0:{self.seed_limit}", "epochs": self.epochs, **self.schedule.describe()}


class _Phases:
    """Seconds of start-up by phase (`startup_s` in the summary), the caller's own included."""

    def __init__(self, startup: dict | None):
        self.t0 = time.perf_counter()
        self.seconds = dict(startup or {})

    @contextlib.contextmanager
    def __call__(self, name: str):
        at = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - at, 3)


class _Tally:
    """Counts the engine's answers (on its writer thread) for the progress bar and the summary;
    remembers the first failure, which the submitter raises."""

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

    def steady_rate(self) -> float | None:
        """Labels/s from the first stored answer to the last: without start-up and shut-down."""
        first = self.first
        if first is None or self.computed <= first[1]:
            return None
        return (self.computed - first[1]) / (self.last - first[0])


@dataclass
class _Submitter:
    """Submits a group of images' missing seeds: one store lookup for the group, the rest to the
    engine with the shortest queue (blocking while it is full)."""

    store: object
    engines: list[LabelEngine]
    tally: _Tally
    present: int = 0

    def submit(self, group: list[tuple[str, object, range]]) -> None:
        """group: (key, member, seeds) per image."""
        keys = [k for k, _, seeds in group for _ in seeds]
        have = self.store.get(keys, [s for _, _, seeds in group for s in seeds]).present
        self.present += int(have.sum())
        self.tally.bar.update(int(have.sum()))
        jobs, at = [], 0
        for key, member, seeds in group:
            row, at = have[at : at + len(seeds)], at + len(seeds)
            if not row.all():
                jobs.append(Job(member, key, tuple(s for s, h in zip(seeds, row) if not h)))
        if jobs:
            min(self.engines, key=lambda e: e.depth).submit(jobs, self.tally, block=True)
        self.tally.check()


def _engine_config(plan: LabelPlan, shards: list[int], batch_size: int, workers: int) -> EngineConfig:
    """Room for two groups of images: the submitter looks up and submits the next group while the
    engine works through the last one, so neither the workers nor the teacher wait for it."""
    widest = max((len(plan.seeds_of(s, 0)) for s in shards), default=1)
    return EngineConfig(
        max_batch_size=batch_size,
        max_queue_delay_ms=50.0,
        max_queue_size=max(4 * batch_size, 2 * GROUP * widest),
        workers=workers,
    )


def _label_shard(s: int, index: SplitIndex, plan: LabelPlan, submitter: _Submitter) -> None:
    """Feed shard `s`'s images to the engines, a group at a time."""
    group = []
    for image, (key, member) in enumerate(index.members(s)):
        group.append((key, member, plan.seeds_of(s, image)))
        if len(group) == GROUP:
            submitter.submit(group)
            group = []
    if group:
        submitter.submit(group)


@dataclass
class _Job:
    """What one precompute job works on, opened once by `_open_job`."""

    cfg: PrecomputeConfig
    plan: LabelPlan
    teachers: list[Teacher]
    manifest: Manifest
    policy: object
    fmt: RecordFormat
    namespace: object
    index: SplitIndex
    store: object
    fingerprint: dict
    names: set[str]  # this node's shards
    mine: list[int]  # their places in the split
    phases: _Phases

    @property
    def shards(self) -> list:
        return self.manifest.shards(self.cfg.split)

    @property
    def labels_wanted(self) -> int:
        return sum(self.plan.labels_in(s, self.shards[s].samples) for s in self.mine)


def precompute(
    cfg: PrecomputeConfig, plan: LabelPlan | None = None, teachers: list[Teacher] | None = None, startup=None
) -> dict:
    """Label every (image, seed) of this node's shards that `cfg` names; returns the summary, whose
    `ok` is False when any label could not be made (a shard that does not match its manifest
    entry, an unreadable image): those labels are counted in `labels_skipped`, never as done.
    `plan`: what to label (default: the config's `--seeds` range or `--epochs` schedule,
    `label_plan`). `teachers`: loaded ones (default: the config's, one per device); several (one
    per device, the same weights) get one engine each, fed by queue depth. `startup`: seconds of
    start-up the caller spent (the teachers' loading), reported with the job's own phases."""
    phases = _Phases(startup)
    if teachers is None:
        with phases("model"):
            teachers = load_teachers(cfg)
    job = _open_job(cfg, plan or label_plan(cfg), teachers, phases)
    tally, submitter, engines, damaged, skipped = _label_node(job)
    ok = not damaged and skipped + tally.skipped == 0
    if ok:
        _record_coverage(job)
    quality = None
    if cfg.quality_labels and tally.computed + submitter.present:  # after the job: not in any rate above
        at = time.perf_counter()
        quality = label_quality(job.store, Path(cfg.shards), cfg.split, job.policy, cfg.quality_labels)
        quality["seconds"] = round(time.perf_counter() - at, 3)
    job.store.close()
    return _summary(job, tally, submitter, engines, damaged, skipped + tally.skipped, ok, quality)


def load_teachers(cfg: PrecomputeConfig) -> list[Teacher]:
    """One teacher per device of `--devices` (or the one `--device`)."""
    return [Teacher(cfg.teacher, device=d) for d in (engine_devices(cfg.devices) if cfg.devices else [cfg.device])]


def label_plan(cfg: PrecomputeConfig) -> LabelPlan:
    """What the config asks to label: a run's schedule (`--epochs`) or one seed range (`--seeds`)."""
    if cfg.epochs is not None:
        split = Manifest.load(cfg.shards).shards(cfg.split)
        return RunSchedule(
            RepeatSchedule(tuple(s.samples for s in split), cfg.repeated_aug, cfg.repeat_mode), cfg.epochs
        )
    return SeedRange(parse_seeds(cfg.seeds))


def _open_job(cfg: PrecomputeConfig, plan: LabelPlan, teachers: list[Teacher], phases: _Phases) -> _Job:
    """The shards, their index, the store's namespace and the render fingerprint, each checked
    before any label is made."""
    if len({t.teacher_id for t in teachers}) != 1:
        raise ValueError("every device must run the same teacher")
    manifest = Manifest.load(cfg.shards)
    policy = manifest.policy(**policy_overrides(cfg.policy, cfg.renderer, cfg.decoder))
    fmt = RecordFormat.parse(cfg.format)
    ns = teachers[0].namespace(policy.policy_id, fmt, manifest.classes)
    split_shards = manifest.shards(cfg.split)
    plan.check(tuple(s.samples for s in split_shards))
    with phases("index"):  # shards without an index are refused, with the command that writes one
        index = SplitIndex.load(cfg.shards, cfg.split, manifest)
    with phases("store"):  # creates the namespace (serving these seeds) before the engines' writers open it
        store = open_store(cfg.store, ns, seed_limit=plan.seed_limit)
    with phases("fingerprint"):  # the labels' bytes and crops: those of these shards and this machine
        check_labelled_bytes(store.coverage(), manifest, cfg.split, f"precompute into namespace {ns.id}")
        fingerprint = claim_fingerprint(
            store, cfg.shards, policy, [t.device for t in teachers], cfg.split, "precompute"
        )
    names = set(node_shards([x.name for x in split_shards], cfg.node_rank, cfg.num_nodes))
    mine = [s for s, shard in enumerate(split_shards) if shard.name in names]
    return _Job(cfg, plan, teachers, manifest, policy, fmt, ns, index, store, fingerprint, names, mine, phases)


def _label_node(job: _Job):
    """Every label of this node's shards, through one engine per teacher; a shard that does not
    match its manifest entry is labelled not at all. (tally, submitter, engines, damaged, skipped)."""
    cfg, phases = job.cfg, job.phases
    config = _engine_config(job.plan, job.mine, cfg.batch_size, cfg.workers)
    damaged: list[str] = []
    skipped = 0
    desc = f"precompute node {cfg.node_rank}/{cfg.num_nodes}"
    with tqdm(total=job.labels_wanted, desc=desc, unit="label", disable=not cfg.progress, smoothing=0.05) as bar:
        tally = _Tally(bar)
        with contextlib.ExitStack() as stack:
            with phases("spawn"):  # the engines' workers started, their buffers page-locked
                engines = [
                    stack.enter_context(
                        LabelEngine(t, job.policy, job.fmt, config, store_url=cfg.store, namespace=job.namespace)
                    )
                    for t in job.teachers
                ]
            submitter = _Submitter(job.store, engines, tally)
            for s in job.mine:
                shard = job.shards[s]
                with phases("verify"):
                    problem = verify_shard(cfg.shards, shard) if cfg.verify else None
                if problem:  # its images may not be the ones the keys name: label none of them
                    log.error("%s; its %d images are not labeled", problem, shard.samples)
                    damaged.append(shard.name)
                    skipped += job.plan.labels_in(s, shard.samples)
                    bar.update(job.plan.labels_in(s, shard.samples))
                    continue
                _label_shard(s, job.index, job.plan, submitter)
        tally.check()  # every label is stored before the summary says so
    return tally, submitter, engines, damaged, skipped


def _record_coverage(job: _Job) -> None:
    """What a trainer checks a run against (this node's part): the plan, how many images and
    labels it holds (which an imported record must bear out) and the digests of the shards'
    bytes (a trainer refuses shards that changed since: labels/provenance.py)."""
    if job.plan.coverage() is None:
        return
    cfg = job.cfg
    record = {**job.plan.coverage(), "node_rank": cfg.node_rank, "num_nodes": cfg.num_nodes}
    counts = {"images": sum(job.shards[s].samples for s in job.mine), "labels": job.labels_wanted}
    job.store.record_coverage({**record, **counts, "shards": job.manifest.shard_digests(cfg.split, job.names)})


def _summary(job: _Job, tally, submitter, engines, damaged: list[str], skipped: int, ok: bool, quality) -> dict:
    cfg, phases = job.cfg, job.phases
    dt = time.perf_counter() - phases.t0
    if tally.first:
        phases.seconds["first_label"] = round(tally.first[0] - phases.t0, 3)  # from the call, phases included
    steady = tally.steady_rate()
    return {
        "store": redact(cfg.store),
        "namespace": job.namespace.id,
        "teacher": job.teachers[0].teacher_id,
        "policy_id": job.policy.policy_id,
        "fingerprint": job.fingerprint["sha256"],
        "format": job.fmt.name,
        "split": cfg.split,
        **job.plan.describe(),
        "node_rank": cfg.node_rank,
        "num_nodes": cfg.num_nodes,
        "shards": len(job.mine),
        "ok": ok,
        "shards_damaged": damaged,
        "images": sum(job.shards[s].samples for s in job.mine),
        "labels_present": submitter.present,
        "labels_computed": tally.computed,
        "devices": [str(t.device) for t in job.teachers],
        "labels_per_device": [int(e.metrics.inference_count.labels(e.device)._value.get()) for e in engines],
        "labels_skipped": skipped,
        # how often the teacher's label is the image's class, on a sample of the crops, by crop scale
        "label_quality": quality,
        "seconds": round(dt, 3),
        "labels_per_s": round(tally.computed / dt, 1) if dt else None,
        "steady_labels_per_s": round(steady, 1) if steady else None,
        # seconds: model (the teachers' loading), store, fingerprint, index, spawn (the engines),
        # verify (every shard's sha256, as it is reached), first_label (from the start)
        "startup_s": phases.seconds,
    }


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
    store: SecretURL = Field(
        "runs/labels.db",
        description="label store URL (a file path, file://, redis://, rediss://); with a password, env:NAME or @FILE",
    )
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
    quality_labels: int = Field(
        20_000, ge=0, description="labels sampled for the summary's label quality (teacher == class, by crop scale)"
    )
    progress: bool = Field(True, description="progress bar")
    teacher: Annotated[TeacherSettings, Nested(title="teacher")] = Field(
        default_factory=TeacherSettings, description="the teacher"
    )


def run_precompute(cfg: PrecomputeConfig) -> tuple[dict, int]:
    """The summary, and exit code 1 when it is not ok (labels missing: see the errors logged)."""
    summary = precompute(cfg)
    return summary, 0 if summary["ok"] else 1


COMMAND = Command(
    "precompute",
    help="label every (image, seed) of a shard set into a store (resumable)",
    config=PrecomputeConfig,
    run=run_precompute,
)
