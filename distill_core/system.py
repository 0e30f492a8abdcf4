"""Facts about the machine a process may use: its cores, a free loopback port, the autocast of its device."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a container's cpuset, a batch
    scheduler's binding), not every core of the machine as os.cpu_count() says. Threads and worker
    processes sized from the machine's count on a pinned process outnumber its cores, and OpenMP
    threads that spin on a shared core slow a step many times over."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def autocast(device, amp: str):
    """The forward's autocast: on CUDA with `amp` bf16 or fp16 (the trainer's and the teacher's
    `auto` resolve to bf16 before they get here), else none."""
    import contextlib

    import torch

    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


def free_port() -> int:
    """A free TCP port on the loopback interface (for tests, benchmarks and local clusters)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
