"""`serve` as a child process on this machine: started, waited for until `/readyz` answers 200, and
stopped by SIGTERM. What the tests, the benchmarks and local scripts start; one implementation.

    with LocalService(serve_argv(shards="runs/demo/shards", teacher=TeacherSettings(checkpoint=CKPT)),
                      log=Path("serve.log")) as svc:
        TeacherClient(svc.url).label(keys, seeds)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from distill_core import free_port, to_argv
from labels.client import TeacherClient

from .app.config import Settings


def serve_argv(**fields) -> list[str]:
    """`serve`'s arguments for these `Settings` fields (the teacher's as `teacher=TeacherSettings(...)`),
    without reading this process's environment: the service reads its own."""
    return to_argv(Settings.model_construct(**fields))


class LocalService:
    def __init__(self, argv: list[str], log: Path, port: int | None = None, env: dict | None = None, command=None):
        """`argv`: serve's arguments (`serve_argv`), without --port; `command`: a whole command line
        instead (e.g. a compose file's), whose own --port is then used as it is."""
        self.port = port or free_port()
        self.argv = command or [sys.executable, "-m", "teacher_service", "serve", *argv, "--port", str(self.port)]
        self.log = Path(log)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None  # launch to the first /readyz 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def launch(self) -> LocalService:
        with open(self.log, "a") as log:  # a file, not a pipe: nobody would read a pipe while it runs
            self.proc = subprocess.Popen(
                [str(a) for a in self.argv], stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        self._t0 = time.perf_counter()
        return self

    def is_ready(self) -> bool:
        """Whether /readyz answers 200; RuntimeError with the log's tail once the process has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"serve exited {self.proc.returncode} before it was ready:\n{self.tail()}")
        if TeacherClient(self.url).ready():
            self.ready_s = self.ready_s or time.perf_counter() - self._t0
            return True
        return False

    def start(self, timeout: float = 300.0) -> LocalService:
        """Launch and wait until ready; TimeoutError (the process killed) after `timeout` seconds."""
        self.launch()
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if time.monotonic() > deadline:
                self.proc.kill()
                raise TimeoutError(f"serve not ready after {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then its exit code (killed when it outlives `timeout`)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> LocalService:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
