"""What an HTTP worker holds while it runs, built once at start-up and injected into routes."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

from distill_core import usable_cpus
from labels.namespace import Namespace, RecordFormat
from labels.store import LabelStore, open_store
from shards import AugmentPolicy, policy_overrides
from shards.index import ShardIndex

from ..engine.client import EngineRouter
from ..engine.contract import EngineConfig
from ..engine.processes import EngineProcesses, engine_devices, engines_from_env
from ..engine.server import EngineSpec
from ..metrics import Metrics
from .config import Settings
from .labeling import LabelService


@dataclass
class ServiceState:
    settings: Settings
    info: dict  # the engines' teacher: model, teacher_id, classes, ...
    policy: AugmentPolicy
    fmt: RecordFormat
    namespace: Namespace
    store: LabelStore
    engines: EngineRouter
    index: ShardIndex | None
    metrics: Metrics
    labels: LabelService
    token: str | None  # bearer token required on /v1 (None: open)
    processes: EngineProcesses | None = None  # engines this worker started itself (no supervisor)

    def close(self) -> None:
        self.engines.close()
        if self.processes is not None:
            self.processes.close()
        self.store.close()


def policy_and_classes(settings: Settings) -> tuple[AugmentPolicy, list[str] | None]:
    """The augmentation policy (the manifest's hint + overrides) and the data set's classes."""
    from shards import Manifest

    if settings.shards:
        manifest = Manifest.load(settings.shards)
        return manifest.policy(settings.renderer, settings.decoder, **settings.policy), manifest.classes
    return AugmentPolicy.from_dict(policy_overrides(settings.policy, settings.renderer, settings.decoder)), None


def engine_processes(settings: Settings) -> EngineProcesses:
    """One engine process per device, with this service's teacher, policy, store and batching."""

    policy, classes = policy_and_classes(settings)
    devices = engine_devices(settings.devices)
    workers = settings.augment_workers or max(1, min(8, usable_cpus() // len(devices)))
    config = EngineConfig(
        max_batch_size=settings.max_batch_size,
        max_queue_delay_ms=settings.max_queue_delay_ms,
        max_queue_size=settings.max_queue_size,
        workers=workers,
        buffers=settings.engine_buffers,
    )
    spec = EngineSpec(
        settings.teacher,
        policy.to_json(),
        classes,
        settings.format,
        settings.store,
        config,
        seed_limit=settings.seed_limit,
        shards=settings.shards,
    )
    return EngineProcesses(spec, devices)


INDEX_ENV = "DISTILL_SHARD_INDEX"  # set by `serve` for its HTTP workers; not a user setting


def load_index(settings: Settings) -> ShardIndex:
    """The shards' member index, checked against their manifest (IndexMismatch, a ValueError,
    naming a damaged index or shards of another size than the manifest says)."""
    return ShardIndex.load(settings.shards, [s.strip() for s in settings.splits.split(",") if s.strip()])


def hand_index(index: ShardIndex, directory: str) -> str:
    """Hand the checked index to the HTTP workers: a small file (the index files' paths, which
    they map again without checking them again) in the supervisor's private `directory`."""
    path = os.path.join(directory, "shard-index.pickle")
    Path(path).write_bytes(pickle.dumps(index, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def build_state(settings: Settings) -> ServiceState:
    """Connect to the engines `serve` started (or start them, when run without it), index the
    shards, open the store under the engines' namespace."""
    processes = None
    found = engines_from_env()
    if found is None:
        processes = engine_processes(settings).start()
        found = processes.addresses, processes.authkey
    engines = EngineRouter.connect(*found)
    info = engines.info
    policy, _ = policy_and_classes(settings)
    index = None
    if os.environ.get(INDEX_ENV):  # checked once by `serve`, in its private directory
        index = pickle.loads(Path(os.environ[INDEX_ENV]).read_bytes())
    elif settings.shards:
        index = load_index(settings)
    fmt = RecordFormat.parse(settings.format)
    namespace = Namespace.from_meta(info["namespace"])
    store = open_store(settings.store, namespace, seed_limit=settings.seed_limit)
    metrics = Metrics()
    labels = LabelService(
        store, engines, index, namespace, fmt, metrics, max_upload_work=settings.max_upload_work,
        upload_cache=settings.upload_cache,
    )  # fmt: skip
    token = settings.bearer_token()
    return ServiceState(
        settings, info, policy, fmt, namespace, store, engines, index, metrics, labels, token, processes
    )
