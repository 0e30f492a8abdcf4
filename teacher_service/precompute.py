"""Batch precompute: label every (image, seed) of a shard set into a store, resumably.

Data-loader workers read the node's shards, ask the store which seeds of each image are missing
(one bulk get per group of images), decode each image once, augment all its missing seeds and
hand full batches to the main process, which runs the teacher and writes the batch's labels in one
bulk put on a writer thread. A killed job restarted with the same arguments skips what is
stored; what it redoes is the batches that were in flight (one prefetched batch per worker, the
one being labeled and at most 4 queued writes).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from shards import Manifest, augment, decode_image, iter_shard
from shards.augment import AugmentPolicy
from shards.stream import SkipCounter

from .namespace import Namespace, RecordFormat, parse_seeds
from .store import open_store
from .teacher import Teacher, add_teacher_args, teacher_config_from_args

log = logging.getLogger(__name__)


def node_shards(names: list[str], node_rank: int, num_nodes: int) -> list[str]:
    """Shards of one node: every num_nodes-th, so N machines cover a data set without overlap."""
    if not 0 <= node_rank < num_nodes:
        raise ValueError(f"--node-rank must be in 0..{num_nodes - 1}")
    return names[node_rank::num_nodes]


@dataclass
class PrecomputeSource(IterableDataset):
    directory: Path
    shard_names: list[str]
    seeds: range
    policy: AugmentPolicy
    store_url: str
    namespace: Namespace
    batch_size: int
    group: int = 64  # images per store lookup

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        store = open_store(self.store_url, self.namespace)
        skips = SkipCounter()
        pending: list[tuple[torch.Tensor, str, int]] = []
        counters = {"images": 0, "present": 0, "skipped": 0}
        for name in self.shard_names[wid::nw]:
            group = []
            for raw in iter_shard(self.directory / name, skips):
                group.append(raw)
                if len(group) == self.group:
                    yield from self._group(group, store, pending, counters, skips)
                    group = []
            yield from self._group(group, store, pending, counters, skips)
        counters["skipped"] = skips.count
        yield self._emit(pending, counters)
        store.close()

    def _group(self, group, store, pending, counters, skips):
        if not group:
            return
        seeds = list(self.seeds)
        keys = [r.key for r in group for _ in seeds]
        have = store.get(keys, seeds * len(group)).present.reshape(len(group), len(seeds))
        counters["present"] += int(have.sum())
        for raw, row in zip(group, have):
            counters["images"] += 1
            missing = [s for s, h in zip(seeds, row) if not h]
            if not missing:
                continue
            try:
                image = decode_image(raw.data)  # once per image, for all its seeds
            except ValueError as e:
                skips(ValueError(f"{raw.key}: {e}"))
                continue
            for s in missing:
                pending.append((augment(image, raw.key, s, self.policy), raw.key, s))
                if len(pending) == self.batch_size:
                    yield self._emit(pending, counters)

    @staticmethod
    def _emit(pending, counters) -> dict:
        out = {
            "image": torch.stack([p[0] for p in pending]) if pending else None,
            "key": [p[1] for p in pending],
            "seed": [p[2] for p in pending],
            **counters,
        }
        pending.clear()
        for k in counters:
            counters[k] = 0
        return out


class BackgroundWriter:
    """Bulk puts on a thread of their own, so the GPU does not wait for the store; bounded, and
    an error in a put is raised in the caller at the next `put` or at `close`."""

    def __init__(self, store, depth: int = 4):
        import queue
        import threading

        self.store = store
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="label-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while (item := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.store.put(*item)
                except BaseException as e:  # surfaced in the main thread
                    self.error = e

    def put(self, *item):
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def close(self):
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def precompute(
    shards: str,
    seeds: range,
    store_url: str,
    teacher: Teacher,
    split: str = "train",
    fmt: RecordFormat = RecordFormat(),
    policy_overrides: dict | None = None,
    batch_size: int = 256,
    workers: int = 2,
    node_rank: int = 0,
    num_nodes: int = 1,
    progress: bool = True,
) -> dict:
    directory = Path(shards)
    manifest = Manifest.load(directory)
    policy = manifest.policy(**(policy_overrides or {}))
    ns = teacher.namespace(policy.policy_id, fmt, manifest.classes)
    store = open_store(store_url, ns)  # creates the namespace before workers open it
    mine = node_shards([s.name for s in manifest.shards(split)], node_rank, num_nodes)
    mine_set = set(mine)
    images = sum(s.samples for s in manifest.shards(split) if s.name in mine_set)
    source = PrecomputeSource(directory, mine, seeds, policy, store_url, ns, batch_size)
    workers = min(workers, len(mine))
    loader = DataLoader(source, batch_size=None, num_workers=workers,
                        prefetch_factor=1 if workers else None, pin_memory=teacher.device.type == "cuda")
    writer = BackgroundWriter(store)
    totals = {"images": 0, "present": 0, "skipped": 0, "computed": 0}
    infer_s = 0.0
    first = None  # (time, labels) when the first batch was stored: steady rate excludes start-up
    t0 = time.perf_counter()
    with tqdm(total=images * len(seeds), desc=f"precompute node {node_rank}/{num_nodes}", unit="label",
              disable=not progress, smoothing=0.05) as bar:
        for item in loader:
            for k in ("images", "present", "skipped"):
                totals[k] += item[k]
            bar.update(item["present"])
            if item["image"] is None:
                continue
            t1 = time.perf_counter()
            classes, probs = teacher.predict(item["image"], fmt.topk)
            infer_s += time.perf_counter() - t1
            writer.put(item["key"], item["seed"], classes.numpy(), probs.numpy() if fmt.probs else None)
            totals["computed"] += len(item["key"])
            if first is None:
                first = (time.perf_counter(), totals["computed"])
            bar.update(len(item["key"]))
            dt = time.perf_counter() - t0
            bar.set_postfix(img_s=f"{totals['images'] / dt:.0f}", new_labels_s=f"{totals['computed'] / dt:.0f}")
    writer.close()  # every label is stored before the summary says so
    end = time.perf_counter()
    dt = end - t0
    steady = (totals["computed"] - first[1]) / (end - first[0]) if first and totals["computed"] > first[1] else None
    store.close()
    return {
        "store": store_url, "namespace": ns.id, "teacher": teacher.teacher_id, "policy_id": policy.policy_id,
        "format": fmt.name, "split": split, "seeds": f"{seeds.start}:{seeds.stop}", "node_rank": node_rank,
        "num_nodes": num_nodes, "shards": len(mine), "images": totals["images"], "labels_present": totals["present"],
        "labels_computed": totals["computed"], "skipped_samples": totals["skipped"], "seconds": round(dt, 3),
        "labels_per_s": round(totals["computed"] / dt, 1) if dt else None,
        "steady_labels_per_s": round(steady, 1) if steady else None,
        "teacher_seconds": round(infer_s, 3),
    }


def cmd_precompute(args) -> int:
    teacher = Teacher(teacher_config_from_args(args))
    summary = precompute(
        args.shards, parse_seeds(args.seeds), args.store, teacher, split=args.split,
        fmt=RecordFormat.parse(args.format), policy_overrides=json.loads(args.policy) if args.policy else None,
        batch_size=args.batch_size, workers=args.workers, node_rank=args.node_rank, num_nodes=args.num_nodes,
        progress=not args.quiet,
    )
    print(json.dumps(summary))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("precompute", help="label every (image, seed) of a shard set into a store (resumable)")
    p.add_argument("--shards", required=True, help="shard directory (with manifest.json)")
    p.add_argument("--split", default="train")
    p.add_argument("--seeds", required=True, help="seed range A:B (a run of E epochs x R repeats needs 0:E*R)")
    p.add_argument("--store", default="runs/labels.db", help="store URL (default: embedded file runs/labels.db)")
    p.add_argument("--format", default="top1", help="record format: top1 (hard labels) or topKp, e.g. top5p (default top1)")
    p.add_argument("--policy", help="JSON of augmentation policy overrides (must match the trainer's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="decode/augment worker processes")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's index when N machines split the shards")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_teacher_args(p)
    p.set_defaults(fn=cmd_precompute)
