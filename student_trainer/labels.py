"""Where the student's teacher targets come from: a label store, the teacher service, or nothing.

Labels are fetched inside the data-loader workers, right after a worker builds a batch, with one
bulk request per batch. The worker then holds the finished batch in the loader's prefetch queue,
so labels for the next batches are in hand while the current batch trains; the training loop
never waits on the store. (The online teacher, DeiT's baseline, runs in the training loop on the
device; see train.py.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset

from shards import AugmentPolicy, ShardStream
from teacher_service.client import TeacherClient
from teacher_service.store import LabelBatch, open_existing

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
    url: str
    namespace: str | None = None
    _store: object = field(default=None, repr=False)

    def open(self):
        if self._store is None:
            self._store = open_existing(self.url, self.namespace)
        return self._store

    def meta(self) -> dict:
        return self.open().namespace.meta()

    def fetch(self, keys, seeds) -> LabelBatch:
        return self.open().get(keys, seeds)

    def __getstate__(self):  # data-loader workers open their own connection
        return {"url": self.url, "namespace": self.namespace, "_store": None}


@dataclass
class ServiceSource:
    url: str
    token: str | None = None
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

    def __init__(self, stream: ShardStream, source, on_missing: str = "error", fallback: ServiceSource | None = None):
        if on_missing not in ON_MISSING:
            raise ValueError(f"--on-missing must be one of {ON_MISSING}")
        if on_missing == "service" and fallback is None:
            raise ValueError("--on-missing service needs --service-url")
        self.stream = stream
        self.source = source
        self.on_missing = on_missing
        self.fallback = fallback

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
            }
            if not labels.present.all():
                miss = np.flatnonzero(~labels.present)
                if self.on_missing == "error":
                    raise MissingLabels(
                        f"{len(miss)} of {len(keys)} labels missing, e.g. ({keys[miss[0]]}, seed {seeds[miss[0]]}); "
                        "precompute them (python -m teacher_service precompute --seeds A:B) or pass --on-missing"
                    )
                if self.on_missing == "service":
                    got = self.fallback.fetch([keys[i] for i in miss], [seeds[i] for i in miss])
                    labels.classes[miss] = got.classes[:, : labels.classes.shape[1]]
                    if labels.probs is not None and got.probs is not None:
                        labels.probs[miss] = got.probs[:, : labels.probs.shape[1]]
                    labels.present[miss] = got.present
                    stats["labels_from_service"] = int(got.present.sum())
            batch["t_classes"] = torch.from_numpy(labels.classes)
            batch["t_probs"] = None if labels.probs is None else torch.from_numpy(labels.probs)
            batch["t_present"] = torch.from_numpy(labels.present)
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
