"""`python -m teacher_service serve`: the supervisor. Flags override DISTILL_* environment variables.

It starts one label-engine process per device, waits until each has its teacher loaded and its
augmentation workers warm, then runs uvicorn with `--http-workers` HTTP processes that connect to
the engines. When an engine dies the supervisor shuts the service down and exits 1, so that the
orchestrator (compose, Kubernetes) restarts it whole.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from distill_core import Command

from .config import Settings

log = logging.getLogger(__name__)


def serve(settings: Settings) -> int:
    import uvicorn

    from .connections import GuardedH11Protocol
    from .state import INDEX_ENV, engine_processes, hand_index, load_index

    settings.bearer_token()  # a missing or empty --token-file fails here, before any engine starts
    if settings.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("binding %s: reachable from other machines", settings.host)
    index = load_index(settings) if settings.shards else None  # a damaged index or shard stops us here
    engines = engine_processes(settings).start()
    os.environ.update(settings.to_env())
    os.environ.update(engines.env())
    if index is not None:  # the HTTP workers map the index files without checking them again
        os.environ[INDEX_ENV] = hand_index(index, engines.directory)
    config = uvicorn.Config(
        "teacher_service.app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.http_workers,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
        http=GuardedH11Protocol,  # connections.py: header deadline and size limits
        h11_max_incomplete_event_size=settings.http_max_header_bytes,
        limit_concurrency=settings.http_max_connections,
    )
    # read by GuardedH11Protocol, in every worker
    config.header_timeout = settings.http_header_timeout
    config.body_timeout = settings.http_body_timeout
    config.max_connections_per_client = settings.http_max_connections_per_client
    if config.workers > 1:
        from uvicorn.supervisors import Multiprocess

        http = Multiprocess(config, sockets=[config.bind_socket()])
        shut_down = http.should_exit.set
    else:
        http = uvicorn.Server(config)
        shut_down = lambda: setattr(http, "should_exit", True)  # noqa: E731
    engine_died, stopping = threading.Event(), threading.Event()

    def watch() -> None:
        while not stopping.wait(1.0):
            if engines.failed():
                log.error("label engine died: %s; shutting down", ", ".join(engines.failed()))
                engine_died.set()
                shut_down()  # uvicorn's graceful shutdown, as on SIGTERM
                return

    watcher = threading.Thread(target=watch, name="engine-watch", daemon=True)
    watcher.start()
    # uvicorn re-raises the signal that stopped it once it has shut down; land it here, stop the
    # engines, then exit by that signal as a process manager expects. Several HTTP workers: uvicorn's
    # Multiprocess set its own handlers when it was made (they stop the workers); ours passes the
    # signal on to them (replacing them left `serve --http-workers 2` deaf to SIGTERM)
    received: list[int] = []
    chained = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if config.workers > 1 else {}

    def on_signal(sig: int, frame) -> None:
        received.append(sig)
        if callable(chained.get(sig)):
            chained[sig](sig, frame)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        http.run()
    finally:
        stopping.set()  # engines stopped from here on are ours, not failures
        watcher.join()
        engines.close()
    if received:
        signal.signal(received[0], signal.SIG_DFL)
        signal.raise_signal(received[0])
    started = getattr(http, "started", True)  # a single server that failed its start-up says so
    return 1 if engine_died.is_set() or not started else 0


COMMAND = Command(
    "serve",
    help="run the REST teacher service: label engines + uvicorn",
    description="Run the REST teacher service (label engines + uvicorn). Every flag can also be set as "
    "DISTILL_<NAME>, e.g. DISTILL_STORE=redis://host:6379/0 or DISTILL_CHECKPOINT=teacher.safetensors.",
    config=Settings,
    run=serve,
)
