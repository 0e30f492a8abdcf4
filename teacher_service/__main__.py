"""python -m teacher_service {precompute,serve,labels {stats,copy,export,import}}"""

from __future__ import annotations

import sys

from distill_core import App
from labels.admin import COMMAND as LABELS
from labels.namespace import NamespaceMismatch
from labels.store import StoreError

from .app.supervisor import COMMAND as SERVE
from .engine.contract import EngineError
from .precompute import COMMAND as PRECOMPUTE

APP = App(
    "python -m teacher_service",
    "Teacher labels: precompute, serve, store admin.",
    [PRECOMPUTE, SERVE, LABELS],
    user_errors=(StoreError, EngineError, NamespaceMismatch),
)

if __name__ == "__main__":
    sys.exit(APP.main())
