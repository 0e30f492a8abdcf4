"""The label engine: the one place the teacher runs, for precompute and for `serve`.

    contract.py   what an engine takes, gives and refuses with: Job, Result, EngineConfig, the
                  errors, check_fits (imports no torch: routes and clients use only this)
    batcher.py    dynamic batching as a state machine (Triton's rules), no threads, no clock
    core.py       LabelEngine: the scheduler, inference and writer threads over the batcher
    pool.py       the augmentation workers (a ProcessPoolExecutor), worker.py their process's code
    server.py     an engine process: a LabelEngine behind a private Unix socket (`serve`)
    messages.py   what crosses that socket
    client.py     the HTTP workers' handles on engine processes, and the router between them
    processes.py  the supervisor's side: one engine process per device

Names are imported on first use: `from teacher_service.engine import Job` loads no torch.
"""

from __future__ import annotations

from distill_core import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(
            ["EngineConfig", "EngineError", "Job", "QueueFull", "RequestTooLarge", "Result", "check_fits"], ".contract"
        ),
        **dict.fromkeys(["LabelEngine", "claim_fingerprint", "render_device", "renders_on_device"], ".core"),
        **dict.fromkeys(["EngineRouter", "LocalEngine", "RemoteEngine"], ".client"),
        **dict.fromkeys(["EngineProcesses", "engine_devices"], ".processes"),
    },
)
