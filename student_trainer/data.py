"""Cached teacher labels in any PyTorch training loop: `labeled_loader`.

    from student_trainer import DataConfig, labeled_loader
    cfg = DataConfig(shards="runs/demo/shards", labels="store", store="runs/demo/labels.db", epochs=30, batch_size=64)
    loader = labeled_loader(cfg)
    for epoch in range(cfg.epochs):
        loader.set_epoch(epoch)                 # before iterating, as with DistributedSampler
        for batch in loader:
            batch["image"]          # [B, 3, H, W] the augmented crops (the teacher labeled these)
            batch["label"]          # [B] true classes
            batch["teacher_label"]  # [B] the teacher's class of each crop, -1 where missing
            batch["present"]        # [B] bool: a teacher label is there
            batch["key"], batch["seed"]  # what identifies each crop: (image key, augmentation seed)

`DataConfig` (config.py) is the trainer's own data flags: `labels` store (`--store`, a file path or
`redis://...`), service (`--service-url`) or none. A batch also carries `teacher_classes` [B, k]
(k = 1 for hard labels) and, for top-k namespaces (`top5p`), `teacher_probs` [B, k]; `skipped`
(unreadable samples replaced) and `label_stats` (counts for a summary).

What the loader promises, the trainer's guarantees (`student_trainer train` uses it):
- every rank gets the same number of batches (`len(loader)`), batch sizes fixed in advance, so DDP
  never waits for a rank that ran out;
- each (image, repeat) the epoch's seed schedule selects is seen exactly once per epoch across
  ranks, with the seed the schedule gives it (`shards/schedule.py`: the contract with precompute);
- labels are fetched in the data-loader workers, one bulk request per batch, so the loop never
  waits on the store;
- before any batch, the labels are checked to fit the run: the augmentation policy, the class
  count, the seeds the run needs and what precompute recorded as done (a mismatch raises
  ValueError naming the precompute flags that fix it), and the labels' render fingerprint: a
  few fixed crops rendered here, where this run renders, must be the bytes the labels were made
  from (`shards/fingerprint.py`; FingerprintMismatch says what differs).

`on_missing` decides what happens to a label the store lacks: `error` (raise MissingLabels in the
worker), `service` (ask the teacher service at `service_url` for it), or `online` / `skip` (keep
the batch with `present` False: the loop fills it with a teacher of its own or drops it from the
distillation loss; `teacher_targets` in `targets.py` does the latter).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential
from torch.utils.data import IterableDataset

from labels.client import TeacherClient
from labels.provenance import check_labelled_bytes
from labels.store import LabelBatch, StoreUnavailable, open_existing, redact
from shards import AugmentPolicy, Manifest, RepeatSchedule, ShardStream, StreamOptions, make_loader
from shards.fingerprint import check as check_fingerprint
from shards.schedule import same_pairs

from .config import ON_MISSING, DataConfig

log = logging.getLogger(__name__)


class MissingLabels(RuntimeError):
    pass


@dataclass
class StoreSource:
    """Labels from a store. An unreachable store is retried for `retry_for` seconds (a Redis
    restart, a failover) before StoreUnavailable ends the run, resumable from its last checkpoint;
    a failed fetch never returns labels that look present."""

    url: str = field(repr=False)
    namespace: str | None = None
    retry_for: float = 60.0
    policy_id: str | None = None  # picks the namespace when the store holds several and none is named
    _store: object = field(default=None, repr=False)

    def open(self):
        if self._store is None:
            self._store = open_existing(self.url, self.namespace, self.policy_id)
        return self._store

    def meta(self) -> dict:
        store = self.open()
        return {
            **store.namespace.meta(),
            "seed_limit": store.refresh_seed_limit(),
            "coverage": store.coverage(),
            "fingerprint": store.fingerprint(),
        }

    def fetch(self, keys, seeds) -> LabelBatch:
        retrying = Retrying(
            retry=retry_if_exception_type(StoreUnavailable),
            stop=stop_after_delay(self.retry_for),
            wait=wait_exponential(multiplier=0.2, max=5.0),
            before_sleep=lambda s: log.warning("label store unavailable, retrying: %s", s.outcome.exception()),
            reraise=True,
        )
        return retrying(lambda: self.open().get(keys, seeds))

    def __getstate__(self):  # data-loader workers open their own connection
        return {**self.__dict__, "_store": None}


@dataclass
class ServiceSource:
    """Labels from the teacher service (cache-through: it computes what its store lacks)."""

    url: str
    token: str | None = field(default=None, repr=False)
    _client: TeacherClient | None = field(default=None, repr=False)

    def client(self) -> TeacherClient:
        if self._client is None:
            self._client = TeacherClient(self.url, token=self.token, timeout=120)
        return self._client

    def meta(self) -> dict:
        info = self.client().info()
        return {
            "id": info["namespace"],
            "policy_id": info["policy_id"],
            "num_classes": info["num_classes"],
            "teacher_id": info["teacher_id"],
            "format": info["format"],
            "seed_limit": info["seed_limit"],
            "fingerprint": info.get("fingerprint"),
        }

    def fetch(self, keys, seeds) -> LabelBatch:
        batch, errors = self.client().label(keys, seeds)
        for e in errors:
            if e:
                log.warning("teacher service: %s", e)
                break
        return batch

    def __getstate__(self):
        return {"url": self.url, "token": self.token, "_client": None}


def open_source(
    labels: str,
    namespace: str | None = None,
    token: str | None = None,
    retry_for: float = 60.0,
    policy_id: str | None = None,
):
    """A teacher service for http(s):// URLs, else a label store (file path, redis://); a store's
    namespace is `namespace`, else its only one, else its only one of `policy_id`."""
    if labels.startswith(("http://", "https://")):
        return ServiceSource(labels, token)
    return StoreSource(labels, namespace, retry_for, policy_id)


class LabeledStream(IterableDataset):
    """A ShardStream whose batches carry the teacher's labels (see the module docstring)."""

    def __init__(
        self,
        stream: ShardStream,
        source,
        on_missing: str = "error",
        fallback: ServiceSource | None = None,
        precompute_hint: str = "--seeds A:B",
    ):
        if on_missing not in ON_MISSING:
            raise ValueError(f"on_missing must be one of {ON_MISSING}, not {on_missing!r}")
        if on_missing == "service" and fallback is None:
            raise ValueError("on_missing='service' needs the teacher service's URL (--service-url)")
        self.stream = stream
        self.source = source
        self.on_missing = on_missing
        self.fallback = fallback
        self.precompute_hint = precompute_hint  # the precompute flags of this run's schedule

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self):
        for batch in self.stream:
            keys, seeds = batch["key"], batch["seed"].tolist()
            labels = self.source.fetch(keys, seeds)
            stats = {
                "labels_cached": int(labels.present.sum()),
                "labels_missing": int((~labels.present).sum()),
                "labels_from_service": 0,
                "labels_service_failed": 0,  # asked of the service under on_missing="service", not labeled
                "labels_unstored": labels.unstored,  # the service computed them; its store refused them
            }
            if not labels.present.all():
                miss = np.flatnonzero(~labels.present)
                if self.on_missing == "error":
                    raise MissingLabels(
                        f"{len(miss)} of {len(keys)} labels missing, e.g. ({keys[miss[0]]}, seed {seeds[miss[0]]}); "
                        f"precompute them (python -m teacher_service precompute {self.precompute_hint}) "
                        "or pass --on-missing service|online|skip"
                    )
                if self.on_missing == "service":
                    got = self.fallback.fetch([keys[i] for i in miss], [seeds[i] for i in miss])
                    labels.classes[miss] = got.classes[:, : labels.classes.shape[1]]
                    if labels.probs is not None and got.probs is not None:
                        labels.probs[miss] = got.probs[:, : labels.probs.shape[1]]
                    labels.present[miss] = got.present
                    stats["labels_from_service"] = int(got.present.sum())
                    stats["labels_service_failed"] = int((~got.present).sum())
                    stats["labels_unstored"] += got.unstored
            classes = torch.from_numpy(labels.classes)
            batch["teacher_label"] = classes[:, 0]
            batch["teacher_classes"] = classes
            if labels.probs is not None:
                batch["teacher_probs"] = torch.from_numpy(labels.probs)
            batch["present"] = torch.from_numpy(labels.present)
            batch["teacher_missing"] = int((~labels.present).sum())  # still missing: a host-side count
            batch["label_stats"] = stats
            yield batch


def check_compatible(namespace_meta: dict, policy: AugmentPolicy, num_classes: int, where: str) -> None:
    """Labels are only usable for the exact augmentation the student sees."""
    if namespace_meta["policy_id"] != policy.policy_id:
        made = (namespace_meta.get("fingerprint") or {}).get("policy") or {}  # what the labels' maker recorded
        mine = policy.to_dict()
        differ = [f"{k}: {made.get(k)!r} there, {v!r} here" for k, v in mine.items() if made and made.get(k) != v]
        detail = f" ({'; '.join(differ)})" if differ else ""
        raise ValueError(
            f"{where}: labels were computed under augmentation policy {namespace_meta['policy_id']}, "
            f"the trainer uses {policy.policy_id}{detail}; train with the labels' policy (--renderer, "
            "--decoder, --policy) or precompute with this one (see `shards inspect`)"
        )
    if int(namespace_meta["num_classes"]) != num_classes:
        raise ValueError(f"{where}: teacher has {namespace_meta['num_classes']} classes, data set has {num_classes}")


def check_labels(
    meta: dict, schedule: RepeatSchedule, epochs: int, on_missing: str, soft: bool, is_store: bool, where: str
) -> None:
    """That the namespace holds what a run of `epochs` epochs under `schedule` asks for: the seed
    range, the schedule precompute recorded as done, and probabilities for soft distillation."""
    needed = schedule.seed_limit_for_run(epochs)
    flags = precompute_flags(schedule, epochs)
    tolerated = is_store and on_missing in ("online", "skip")  # beyond the range: missing
    if needed > meta["seed_limit"] and not tolerated:
        raise ValueError(
            f"{where}: the run needs seeds 0:{needed} but namespace {meta['id']} serves 0:{meta['seed_limit']}; "
            f"precompute with {flags} (or --seeds 0:{needed}), or pass --on-missing online|skip"
        )
    covered = covering_records(meta.get("coverage", []), schedule, epochs)
    # a run that fills gaps itself (on_missing service|online|skip) may start on partial labels
    if meta.get("coverage") and not covered and on_missing == "error":
        made = "; ".join(json.dumps(r, sort_keys=True) for r in meta["coverage"])
        raise ValueError(
            f"{where}: namespace {meta['id']} holds labels precomputed for {made}, not for this run's "
            f"schedule; precompute with {flags}, or pass --on-missing service|online|skip"
        )
    if soft and "p" not in meta["format"]:
        raise ValueError(f"soft distillation from cached labels needs a topKp format, the store has {meta['format']}")


def precompute_flags(schedule: RepeatSchedule, epochs: int) -> str:
    """The precompute flags that label what a run of `epochs` epochs under `schedule` asks for."""
    return f"--epochs {epochs} --repeated-aug {schedule.repeats} --repeat-mode {schedule.mode}"


NODE_FIELDS = ("node_rank", "num_nodes", "shards", "images", "labels")  # one node's part of a record


def covering_records(records: list[dict], schedule: RepeatSchedule, epochs: int) -> list[dict]:
    """The precompute records (`LabelStore.coverage`) that, with all their nodes done, hold every
    label a run of `epochs` epochs under `schedule` asks for."""
    done: dict[str, set[int]] = {}
    for r in records:
        what = {k: v for k, v in r.items() if k not in NODE_FIELDS}
        done.setdefault(json.dumps({**what, "num_nodes": r.get("num_nodes", 1)}, sort_keys=True), set()).add(
            r.get("node_rank", 0)
        )
    out = []
    for text, ranks in done.items():
        r = json.loads(text)
        if ranks != set(range(r["num_nodes"])):
            continue  # some node of it has not finished
        if "seeds" in r:
            ok = r["seeds"] >= schedule.seed_limit_for_run(epochs)
        else:
            ok = same_pairs(r, schedule.describe()) and r["epochs"] >= epochs
        if ok:
            out.append(r)
    return out


class LabeledLoader:
    """A DataLoader over a (labeled) ShardStream; what `labeled_loader` returns."""

    def __init__(self, dataset: ShardStream | LabeledStream, loader, namespace: str | None):
        self.dataset = dataset
        self.loader = loader
        self.namespace = namespace  # the label namespace's id (None without labels)
        self.stream = dataset.stream if isinstance(dataset, LabeledStream) else dataset

    @property
    def schedule(self) -> RepeatSchedule:
        return self.stream.schedule

    @property
    def policy(self) -> AugmentPolicy:
        return self.stream.policy

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating each epoch (the loader's persistent workers read it then)."""
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        return iter(self.loader)


def labeled_loader(
    cfg: DataConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    soft: bool = False,
    render_on_device: bool | None = None,
    manifest: Manifest | None = None,
    policy: AugmentPolicy | None = None,
) -> LabeledLoader:
    """Training batches of `cfg.shards` with the teacher labels `cfg.labels` names (store, service or
    none) for a run of `cfg.epochs` epochs under DeiT's repeated augmentation (`repeated_aug`,
    `repeat_mode`: the schedule precompute labeled). `rank`/`world_size`: this process's share
    (torchrun's RANK / WORLD_SIZE). `device`: where the model runs; a torch-renderer policy on an
    accelerator is rendered there (batches carry `shards.stream.Regions` for `images_on_device(batch,
    policy, device)`), and the labels' fingerprint is checked there. `soft`: the run needs teacher
    probabilities (a topKp namespace). `render_on_device`: render a torch policy's crops on `device`
    even on the CPU (None: on an accelerator). `manifest`/`policy`: the caller's, when it has built
    them (else from `cfg`). See the module docstring for the batch."""
    device = torch.device(device)
    manifest = manifest or Manifest.load(cfg.shards)
    policy = policy or cfg.augment_policy(manifest)
    if render_on_device is None:
        render_on_device = device.type != "cpu"
    render_on_device = render_on_device and policy.renderer == "torch"
    stream = ShardStream(
        cfg.shards,
        "train",
        policy,
        cfg.batch_size,
        options=StreamOptions(
            mode="train",
            rank=rank,
            world_size=world_size,
            repeats=cfg.repeated_aug,
            repeat_mode=cfg.repeat_mode,
            seed=cfg.seed,
            render_on_device=render_on_device,
        ),
        manifest=manifest,
    )
    dataset, ns = stream, None
    if cfg.labels_url is not None:
        source = open_source(cfg.labels_url, cfg.namespace, cfg.service_token, cfg.store_retry_for, policy.policy_id)
        meta = source.meta()
        where = redact(cfg.labels_url)
        check_compatible(meta, policy, len(manifest.classes), where)
        check_labels(meta, stream.schedule, cfg.epochs, cfg.on_missing, soft, isinstance(source, StoreSource), where)
        check_labelled_bytes(meta.get("coverage") or [], manifest, "train", where)
        if meta.get("fingerprint"):
            check_fingerprint(meta["fingerprint"], cfg.shards, policy, device if render_on_device else "cpu", where)
        else:
            log.warning(
                "%s: the labels carry no render fingerprint (made before fingerprints, or by a service "
                "without shards): that this run renders the crops they were made from is not checked",
                where,
            )
        fallback = ServiceSource(cfg.service_url, cfg.service_token) if cfg.on_missing == "service" else None
        hint = precompute_flags(stream.schedule, cfg.epochs)
        dataset, ns = LabeledStream(stream, source, cfg.on_missing, fallback, hint), meta["id"]
    loader = make_loader(dataset, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    return LabeledLoader(dataset, loader, ns)


def eval_loader(
    cfg: DataConfig,
    split: str = "val",
    *,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    manifest: Manifest | None = None,
    policy: AugmentPolicy | None = None,
):
    """Evaluation batches (`image`, `label`, `key`) of a split: DeiT's eval transform, every image
    once across ranks, in at most one loader worker (evaluation is short; a worker's start is not)."""
    manifest = manifest or Manifest.load(cfg.shards)
    policy = policy or cfg.augment_policy(manifest)
    stream = ShardStream(
        cfg.shards,
        split,
        policy,
        cfg.batch_size,
        options=StreamOptions(mode="eval", rank=rank, world_size=world_size),
        manifest=manifest,
    )
    return make_loader(stream, num_workers=min(cfg.workers, 1), pin_memory=torch.device(device).type == "cuda")
