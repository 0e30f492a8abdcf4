"""What the service holds while it runs, built once at start-up and injected into routes."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from shards import AugmentPolicy, Manifest

from ..namespace import Namespace, RecordFormat
from ..store import LabelStore, open_store
from ..teacher import Teacher, TeacherConfig
from .batcher import DynamicBatcher
from .config import Settings
from .images import AugmentPool, ShardIndex
from .metrics import Metrics


@dataclass
class ServiceState:
    settings: Settings
    teacher: Teacher
    policy: AugmentPolicy
    fmt: RecordFormat
    classes: list[str]
    namespace: Namespace
    store: LabelStore
    batcher: DynamicBatcher
    pool: AugmentPool
    index: ShardIndex | None
    metrics: Metrics
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("teacher_service.app"))

    def retry_after(self) -> str:
        """Seconds until the queue has likely drained: depth / observed batch rate, at least 1."""
        return "1" if self.batcher.depth < 4 * self.batcher.max_batch_size else "2"

    def close(self) -> None:
        self.batcher.close()
        self.pool.close()
        self.store.close()


def build_state(settings: Settings, teacher: Teacher | None = None) -> ServiceState:
    teacher = teacher or Teacher(TeacherConfig(
        model=settings.model, checkpoint=settings.checkpoint, pretrained=settings.pretrained,
        random_init=settings.random_init, num_classes=settings.num_classes, device=settings.device,
        amp=settings.amp))
    overrides = json.loads(settings.policy) if settings.policy else {}
    index = None
    if settings.shards:
        splits = [s.strip() for s in settings.splits.split(",") if s.strip()]
        index = ShardIndex(settings.shards, splits)
        manifest: Manifest = index.manifest
        policy = manifest.policy(**overrides)
        classes = manifest.classes
    else:
        policy = AugmentPolicy.from_dict(overrides)
        classes = teacher.classes
    fmt = RecordFormat.parse(settings.format)
    namespace = teacher.namespace(policy.policy_id, fmt, classes)
    store = open_store(settings.store, namespace)
    metrics = Metrics()
    batcher = DynamicBatcher(teacher, fmt.topk, metrics, settings.max_batch_size, settings.max_queue_delay_ms,
                             settings.max_queue_size)
    pool = AugmentPool(policy.to_json(), settings.augment_workers)
    pool.warm()
    return ServiceState(settings, teacher, policy, fmt, classes, namespace, store, batcher, pool, index, metrics)
