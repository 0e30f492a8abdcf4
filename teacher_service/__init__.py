"""The teacher: one runtime, the label engine that runs it, label stores, the precompute job, the
REST service and its client.

    from teacher_service import Teacher, TeacherSettings, open_store, TeacherClient
    from teacher_service.precompute import precompute

Names are imported on first use, so that a process needing one part (an augmentation worker, a
trainer's data-loader worker) does not pay for the others.
"""

from __future__ import annotations

from distill_core import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "Teacher": ".teacher",
        "TeacherSettings": ".teacher",
        "LabelEngine": ".engine",
        "EngineConfig": ".engine",
        "EngineError": ".engine",
        "QueueFull": ".engine",
        "Job": ".engine",
        "Namespace": ".namespace",
        "NamespaceMismatch": ".namespace",
        "RecordFormat": ".namespace",
        "LabelBatch": ".store",
        "LabelStore": ".store",
        "StoreError": ".store",
        "StoreUnavailable": ".store",
        "open_store": ".store",
        "open_existing": ".store",
        "list_namespaces": ".store",
        "PrecomputeConfig": ".precompute",
        "Settings": ".app.config",
        "create_app": ".app.main",
        "TeacherClient": ".client",
        "ServiceError": ".client",
    },
)
