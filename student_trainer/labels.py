"""The student's teacher targets, from wherever they come: a label store, the teacher service, an
online teacher, or nothing; and every `--on-missing` policy. Two halves:

- `LabeledStream`, in the data-loader workers: one bulk request per batch, right after the worker
  builds it, so the labels of the next batches are in hand while the current batch trains (the
  loop never waits on the store). `--on-missing error` raises here, `service` asks the teacher
  service for the missing ones here.
- `TeacherTargetBuilder`, in the training loop on the device: the batch's labels (or an online
  teacher's logits) as the distillation target, mixed with the images' mixup/cutmix lambda;
  `--on-missing online` runs the teacher on the missing crops, `skip` masks them. Whether any
  label is missing is a host-side count from the loader, so the step never waits on the device.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential
from torch.utils.data import IterableDataset

from shards import AugmentPolicy, RepeatSchedule, ShardStream
from shards.schedule import same_pairs
from teacher_service.client import TeacherClient
from teacher_service.store import LabelBatch, StoreUnavailable, open_existing, redact

from .config import TrainConfig
from .loss import TeacherTargets

log = logging.getLogger(__name__)

ON_MISSING = ("error", "service", "online", "skip")


class MissingLabels(RuntimeError):
    pass


def check_compatible(namespace_meta: dict, policy: AugmentPolicy, num_classes: int, where: str) -> None:
    """Labels are only usable for the exact augmentation the student sees."""
    if namespace_meta["policy_id"] != policy.policy_id:
        raise ValueError(
            f"{where}: labels were computed under augmentation policy {namespace_meta['policy_id']}, "
            f"the trainer uses {policy.policy_id}; precompute with the same policy (see `shards inspect`)"
        )
    if int(namespace_meta["num_classes"]) != num_classes:
        raise ValueError(f"{where}: teacher has {namespace_meta['num_classes']} classes, data set has {num_classes}")


@dataclass
class StoreSource:
    """Labels from a store. An unreachable store is retried for `retry_for` seconds (a Redis
    restart, a failover) before StoreUnavailable ends the run, resumable from its last checkpoint;
    a failed fetch never returns labels that look present."""

    url: str = field(repr=False)
    namespace: str | None = None
    retry_for: float = 60.0
    _store: object = field(default=None, repr=False)

    def open(self):
        if self._store is None:
            self._store = open_existing(self.url, self.namespace)
        return self._store

    def meta(self) -> dict:
        store = self.open()
        return {**store.namespace.meta(), "seed_limit": store.refresh_seed_limit(), "coverage": store.coverage()}

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
        return {"url": self.url, "namespace": self.namespace, "retry_for": self.retry_for, "_store": None}


@dataclass
class ServiceSource:
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


class LabeledStream(IterableDataset):
    """A ShardStream whose batches carry the teacher's labels: t_classes, t_probs, t_present."""

    def __init__(
        self,
        stream: ShardStream,
        source,
        on_missing: str = "error",
        fallback: ServiceSource | None = None,
        precompute_hint: str = "--seeds A:B",
    ):
        if on_missing not in ON_MISSING:
            raise ValueError(f"--on-missing must be one of {ON_MISSING}")
        if on_missing == "service" and fallback is None:
            raise ValueError("--on-missing service needs --service-url")
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
                    stats["labels_unstored"] += got.unstored
            batch["t_classes"] = torch.from_numpy(labels.classes)
            batch["t_probs"] = None if labels.probs is None else torch.from_numpy(labels.probs)
            batch["t_present"] = torch.from_numpy(labels.present)
            batch["t_missing"] = int((~labels.present).sum())  # still missing: the loop's host-side test
            batch["label_stats"] = stats
            yield batch


def target_distribution(classes: torch.Tensor, probs: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """[B, k] cached classes (+ probabilities) -> [B, C] target distribution.

    Hard labels become one-hot. With top-k probabilities the rest of the mass is spread evenly
    over the other classes (the store keeps only the top k).
    """
    b, k = classes.shape
    valid = classes.clamp_min(0)
    if probs is None:
        return torch.zeros(b, num_classes, device=classes.device).scatter_(1, valid[:, :1], 1.0)
    p = probs.float().clamp_min(0)
    rest = (1.0 - p.sum(1, keepdim=True)).clamp_min(0) / max(num_classes - k, 1)
    dist = rest.expand(b, num_classes).clone()
    return dist.scatter_(1, valid, p)


def with_teacher_labels(stream: ShardStream, cfg: TrainConfig, policy: AugmentPolicy, num_classes: int):
    """(dataset, namespace id): the stream itself without cached labels, else a LabeledStream over
    the store or the service, after checking that its labels fit this run (policy, classes, format,
    and the seeds the schedule needs)."""
    if cfg.labels not in ("store", "service"):
        return stream, None
    if cfg.labels == "store":
        source = StoreSource(cfg.store, cfg.namespace, cfg.store_retry_for)
    else:
        source = ServiceSource(cfg.service_url, cfg.service_token)
    meta = source.meta()
    where = redact(cfg.store or cfg.service_url)
    check_compatible(meta, policy, num_classes, where)
    needed = stream.schedule.seed_limit_for_run(cfg.epochs)
    tolerated = cfg.labels == "store" and cfg.on_missing in ("online", "skip")  # beyond the range: missing
    if needed > meta["seed_limit"] and not tolerated:
        raise ValueError(
            f"{where}: the run needs seeds 0:{needed} but namespace {meta['id']} serves 0:{meta['seed_limit']}; "
            f"precompute with --epochs {cfg.epochs} --repeated-aug {cfg.repeated_aug} --repeat-mode {cfg.repeat_mode} "
            f"(or --seeds 0:{needed}), or pass --on-missing online|skip"
        )
    covered = covering_records(meta.get("coverage", []), stream.schedule, cfg.epochs)
    # a run that fills gaps itself (--on-missing service|online|skip) may start on partial labels
    if meta.get("coverage") and not covered and cfg.on_missing == "error":
        made = "; ".join(json.dumps(r, sort_keys=True) for r in meta["coverage"])
        raise ValueError(
            f"{where}: namespace {meta['id']} holds labels precomputed for {made}, not for this run's "
            f"schedule; precompute with --epochs {cfg.epochs} --repeated-aug {cfg.repeated_aug} "
            f"--repeat-mode {cfg.repeat_mode}, or pass --on-missing service|online|skip"
        )
    if cfg.distillation_type == "soft" and "p" not in meta["format"]:
        raise ValueError(f"soft distillation from cached labels needs a topKp format, the store has {meta['format']}")
    fallback = ServiceSource(cfg.service_url, cfg.service_token) if cfg.service_url else None
    hint = f"--epochs {cfg.epochs} --repeated-aug {cfg.repeated_aug} --repeat-mode {cfg.repeat_mode}"
    return LabeledStream(stream, source, cfg.on_missing, fallback, hint), meta["id"]


def covering_records(records: list[dict], schedule: RepeatSchedule, epochs: int) -> list[dict]:
    """The precompute records (`LabelStore.coverage`) that, with all their nodes done, hold every
    label a run of `epochs` epochs under `schedule` asks for."""
    done: dict[str, set[int]] = {}
    for r in records:
        what = {k: v for k, v in r.items() if k not in ("node_rank", "num_nodes")}
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


class TeacherTargetBuilder:
    """The distillation target of a training batch (see the module docstring)."""

    def __init__(self, labels: str, on_missing: str, distillation_type: str, num_classes: int, teacher=None):
        self.labels = labels
        self.on_missing = on_missing
        self.soft = distillation_type == "soft"
        self.num_classes = num_classes
        self.teacher = teacher
        self.labels_online = 0  # missing labels the online teacher filled in

    def __call__(self, batch: dict, x: torch.Tensor, lam: float | None) -> TeacherTargets | None:
        """`x`: the batch's (mixed) images on the device, `lam`: the mixup lambda (None: no mixing)."""
        if self.labels == "none":
            return None
        if self.labels == "online":  # DeiT's baseline: the teacher sees the mixed image
            return TeacherTargets(logits=self.teacher.logits(x))
        n, device = len(x), x.device  # mixup may have dropped an odd last sample
        probs = batch["t_probs"]
        dist = target_distribution(
            batch["t_classes"][:n].to(device, non_blocking=True),
            None if probs is None else probs[:n].to(device, non_blocking=True),
            self.num_classes,
        )
        weight = None
        if batch["t_missing"]:
            present = batch["t_present"][:n]
            if self.on_missing == "online":
                miss = (~present).nonzero().flatten()  # a CPU tensor: no wait on the device
                if len(miss):
                    miss = miss.to(device, non_blocking=True)
                    logits = self.teacher.logits(x[miss])  # the teacher sees the mixed image, as online
                    one_hot = F.one_hot(logits.argmax(1), self.num_classes).float()
                    dist[miss] = logits.softmax(1) if self.soft else one_hot
                    self.labels_online += len(miss)
            else:  # skip: the missing rows carry no distillation loss
                weight = present.float().to(device, non_blocking=True)
        if lam is not None:  # same lambda and pairing as the images
            dist = lam * dist + (1 - lam) * dist.flip(0)
            if weight is not None:
                weight = weight * weight.flip(0)
        return TeacherTargets(dist=dist, weight=weight)
