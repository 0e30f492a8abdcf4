"""Process lifetime: a child process that goes when its parent goes (no orphans after a kill -9)."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import threading
from collections.abc import Callable


def exit_with_parent(cleanup: Callable[[], None] | None = None) -> None:
    """Exit when the multiprocessing parent of this process is gone, after `cleanup` (what the
    parent can no longer remove). The label engine's augmentation workers, the engine processes
    and `serve`'s HTTP workers call it at their start. A process not started by multiprocessing
    has no such parent: nothing to watch."""
    from multiprocessing.connection import wait

    parent = mp.parent_process()
    if parent is None:
        return

    def run():
        wait([parent.sentinel])
        if cleanup is not None:
            with contextlib.suppress(Exception):
                cleanup()
        os._exit(0)

    threading.Thread(target=run, name="parent-watch", daemon=True).start()
