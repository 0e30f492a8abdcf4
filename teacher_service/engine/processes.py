"""The supervisor's side: one engine process per device, and how its HTTP workers find them."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field, replace

import torch.multiprocessing as mp

from distill_core import usable_cpus

from ..metrics import enable_multiprocess, mark_process_dead
from .contract import EngineError
from .server import EngineSpec, engine_main

log = logging.getLogger(__name__)

ADDRESSES_ENV = "DISTILL_ENGINE_SOCKETS"  # set by `serve` for its HTTP workers; not a user setting
AUTHKEY_ENV = "DISTILL_ENGINE_AUTHKEY"


def engine_devices(devices: str) -> list[str]:
    """'auto': one engine per visible GPU, else one on the CPU; or a comma list (cuda:0,cuda:1)."""
    import torch

    from labels.teacher import pick_device

    if devices == "auto":
        n = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    names = [d.strip() for d in devices.split(",") if d.strip()]
    if not names:
        raise ValueError("--devices must name at least one device")
    out = [str(pick_device(d)) for d in names]  # checked here, before any engine starts
    cores = usable_cpus()
    for device in sorted(set(out)):
        n = out.count(device)
        if n > 1 and device != "cpu":
            raise ValueError(f"--devices names {device} {n} times: one engine per GPU")
        if n > cores:
            raise ValueError(
                f"--devices names cpu {n} times: {n} engines, each with its own teacher and augmentation "
                f"workers, on {cores} cores; at most {cores} (an engine's workers already take the cores it has)"
            )
        if n > 1:
            log.info(
                "--devices: %d engines on the CPU, each with its own teacher and workers (a share of the cores)", n
            )
    return out


@dataclass
class EngineProcesses:
    """The supervisor's side: one engine process per device, metrics shared through files."""

    spec: EngineSpec
    devices: list[str]
    processes: list = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    authkey: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _dir: str | None = None

    def start(self, timeout: float = 600.0) -> EngineProcesses:
        self._dir = tempfile.mkdtemp(prefix="distill-engines-")  # private (0700): sockets and metrics
        os.makedirs(os.path.join(self._dir, "metrics"))
        enable_multiprocess(os.path.join(self._dir, "metrics"))
        ctx = mp.get_context("spawn")
        pipes = []
        for i, device in enumerate(self.devices):
            address = os.path.join(self._dir, f"engine-{i}.sock")
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=engine_main,
                name=f"engine-{device}",
                daemon=False,
                args=(replace(self.spec, device=device), address, self.authkey, child),
            )
            p.start()
            child.close()
            self.processes.append(p)
            self.addresses.append(address)
            pipes.append(parent)
        for p, pipe in zip(self.processes, pipes):
            if not pipe.poll(timeout):
                self.close()
                raise EngineError(f"{p.name} did not become ready in {timeout:.0f}s")
            try:
                kind, detail = pipe.recv()
            except EOFError:
                kind, detail = "error", f"exited with code {p.exitcode}"
            if kind != "ready":
                self.close()
                raise EngineError(f"{p.name} failed to start: {detail}")
        return self

    @property
    def directory(self) -> str:
        """The pool's private directory (mode 0700, removed at close): sockets, metrics, hand-overs."""
        return self._dir

    def env(self) -> dict[str, str]:
        """What an HTTP worker needs to connect (it inherits the environment)."""
        return {ADDRESSES_ENV: ",".join(self.addresses), AUTHKEY_ENV: self.authkey.hex()}

    def failed(self) -> list[str]:
        return [f"{p.name} (exit code {p.exitcode})" for p in self.processes if p.exitcode is not None]

    def close(self) -> None:
        for p in self.processes:
            if p.is_alive():
                p.terminate()
        for p in self.processes:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
                p.join()
            mark_process_dead(p.pid)
        self.processes.clear()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def engines_from_env() -> tuple[list[str], bytes] | None:
    addresses = os.environ.get(ADDRESSES_ENV)
    if not addresses:
        return None
    return addresses.split(","), bytes.fromhex(os.environ[AUTHKEY_ENV])
