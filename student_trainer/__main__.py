"""python -m student_trainer {train,plot}  (train also under torchrun)"""

from __future__ import annotations

import sys

from distill_core import App, Command
from labels.client import ServiceError
from labels.store import StoreError

from .config import TrainConfig
from .data import MissingLabels
from .plot import COMMAND as PLOT


def run_train(cfg: TrainConfig) -> dict | None:
    from .train import train

    return train(cfg) or None  # ranks other than 0 print no summary


TRAIN = Command(
    "train",
    help="train a student (or the demo teacher); also under torchrun",
    description="Train a DeiT student with DDP from torchrun's environment; labels from a store, the teacher "
    "service, an online teacher, or none.",
    config=TrainConfig,
    run=run_train,
)


APP = App(
    "python -m student_trainer",
    "DeiT students from cached teacher labels.",
    [TRAIN, PLOT],
    user_errors=(StoreError, ServiceError, MissingLabels),
)

if __name__ == "__main__":
    sys.exit(APP.main())
