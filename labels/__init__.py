"""The labels layer both sides stand on: the label namespace, the stores (Redis, the embedded file),
label files, the teacher service's client, and the teacher runtime (model load and forward).

    from labels import open_store, Namespace, RecordFormat, Teacher, TeacherSettings, TeacherClient

`teacher_service` (the engine, precompute, the REST service) and `student_trainer` both import
it; it imports neither. Names are imported on first use.
"""

from __future__ import annotations

from distill_core import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "Teacher": ".teacher",
        "TeacherSettings": ".teacher",
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
        "TeacherClient": ".client",
        "ServiceError": ".client",
        "export_namespace": ".files",
        "import_namespace": ".files",
    },
)
