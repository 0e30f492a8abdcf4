"""An augmentation worker process: what runs in each of the engine's worker processes.

`init` runs once per process (ProcessPoolExecutor's initializer): one torch thread, exit with the
engine's process, the policy, and in "augment" mode timm's transform built before the first task
(the other modes import no timm at all). `ready` is the start-up handshake; `run` labels nothing,
it makes the crops of one augmentation task (`batcher.Task`) in the shared batch buffer and says
what it could not do:

- "augment": decode each image once, write each seed's finished float crop into its slot;
- "cut": decode, draw each seed's parameters, write its uint8 crop (the device renders it);
- "headers": an nvJPEG policy's JPEGs stay encoded (the device decodes the batch); only their
  headers are read to draw the parameters. Other formats are prepared.

The result is (buffer id, {slot: error}, {slot: (JPEG bytes or None, params)}).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from distill_core.process import exit_with_parent
from shards import AugmentPolicy, augment, cut_crop, decode_image
from shards.augment import draw_for_device_decode, train_transform
from shards.device_decode import is_jpeg
from shards.members import Member, OpenFiles

MODES = ("augment", "cut", "headers")


@dataclass
class _State:
    buffers: list[torch.Tensor]
    policy: AugmentPolicy
    mode: str
    barrier: object
    files: OpenFiles


_state: _State | None = None  # this process's, set by init


def init(buffers: list[torch.Tensor], policy_json: str, mode: str, barrier) -> None:
    global _state
    if mode not in MODES:
        raise ValueError(f"worker mode must be one of {MODES}, not {mode!r}")
    torch.set_num_threads(1)
    exit_with_parent()
    policy = AugmentPolicy.from_json(policy_json)
    if mode == "augment":
        train_transform(policy)  # built before the first task
    _state = _State(buffers, policy, mode, barrier, OpenFiles())


def ready(timeout: float) -> int:
    """Wait until every worker of the pool has run `init` (one `ready` task per worker, each held
    at the barrier until all have arrived, so each process takes exactly one): its pid."""
    _state.barrier.wait(timeout)
    return os.getpid()


def run(task) -> tuple[int, dict[int, str], dict[int, tuple]]:
    """Make one task's crops; see the module docstring. Every image of the task is read and decoded
    first, then every crop is made: two loops that each keep their code and data hot in the core's
    caches, where one image's decode between two crops costs a 32 px crop about a tenth more
    (`bench/worker_task.py`). At most one task's images (a batch's share) are decoded at once."""
    s = _state
    bid, entries = task
    buf = s.buffers[bid]
    errors: dict[int, str] = {}
    prepared: dict[int, tuple] = {}
    decoded = []
    for source, key, pairs in entries:
        try:
            data = source.read(s.files) if isinstance(source, Member) else source
            if s.mode == "headers" and is_jpeg(data):
                for seed, slot in pairs:
                    prepared[slot] = draw_for_device_decode(data, key, seed, s.policy)
                continue
            decoded.append((key, decode_image(data), pairs))
        except (ValueError, OSError) as e:
            errors.update((slot, f"{key}: {e}") for _, slot in pairs)
    for key, image, pairs in decoded:
        for seed, slot in pairs:
            try:
                if s.mode == "augment":
                    buf[slot].copy_(augment(image, key, seed, s.policy, restore_rng=False))  # our own RNGs
                else:
                    crop, params = cut_crop(image, key, seed, s.policy)
                    buf[slot].copy_(crop)
                    prepared[slot] = (None, params)
            except Exception as e:  # an augmentation bug: this crop fails, not the engine
                errors[slot] = f"{key} seed {seed}: augmentation failed: {e!r}"
    return bid, errors, prepared
