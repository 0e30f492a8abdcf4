"""The teacher's side: the label engine that runs the teacher, the precompute job and the REST
service. The runtime, the stores and the client are the labels layer's (`labels`); their names
are re-exported here.

    from teacher_service import LabelEngine, PrecomputeConfig, create_app
    from teacher_service.precompute import precompute

Names are imported on first use, so that a process needing one part (an augmentation worker, a
trainer's data-loader worker) does not pay for the others.
"""

from __future__ import annotations

from distill_core import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "Teacher": "labels.teacher",
        "TeacherSettings": "labels.teacher",
        "LabelEngine": ".engine.core",
        "EngineConfig": ".engine.contract",
        "EngineError": ".engine.contract",
        "QueueFull": ".engine.contract",
        "Job": ".engine.contract",
        "Namespace": "labels.namespace",
        "NamespaceMismatch": "labels.namespace",
        "RecordFormat": "labels.namespace",
        "LabelBatch": "labels.store",
        "LabelStore": "labels.store",
        "StoreError": "labels.store",
        "StoreUnavailable": "labels.store",
        "open_store": "labels.store",
        "open_existing": "labels.store",
        "list_namespaces": "labels.store",
        "PrecomputeConfig": ".precompute",
        "Settings": ".app.config",
        "create_app": ".app.main",
        "TeacherClient": "labels.client",
        "ServiceError": "labels.client",
    },
)
