"""Facts about the machine a process may use."""

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
