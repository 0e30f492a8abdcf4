"""The messages between an engine process and its clients (HTTP workers), one type each.

multiprocessing.connection pickles them over the engine's private, authenticated Unix socket.
Work goes in as (tar member or bytes, key, seeds) jobs; labels come out; pixels never cross.
"""

from __future__ import annotations

from dataclasses import dataclass

from .contract import Job, Result


@dataclass(frozen=True)
class Hello:
    """The engine's first message on a connection: what it runs (model, namespace, device, limits)."""

    info: dict


@dataclass(frozen=True)
class Label:
    """Label these jobs; the answer names the same request id."""

    rid: int
    jobs: list[Job]


@dataclass(frozen=True)
class Done:
    rid: int
    result: Result


@dataclass(frozen=True)
class Full:
    """The engine's queue could not take the request; nothing of it was started."""

    rid: int
    message: str
    retry_after: float


@dataclass(frozen=True)
class Failed:
    rid: int
    message: str
