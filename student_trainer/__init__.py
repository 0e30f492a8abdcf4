"""The DeiT student: configuration, the DDP training loop, DeiT's loss and where teacher labels
come from (a store, the service, an online teacher).

    from student_trainer import TrainConfig
    from student_trainer.train import train
    summary = train(TrainConfig(shards="runs/demo/shards", out="runs/x", labels="store", store="runs/demo/labels.db"))

Names are imported on first use (a data-loader worker needs the label sources, not the loop). The
function `train` is reached through its module of the same name.
"""

from __future__ import annotations

from distill_core import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "TrainConfig": ".config",
        "DistillationLoss": ".loss",
        "TeacherTargets": ".loss",
        "LabeledStream": ".labels",
        "StoreSource": ".labels",
        "ServiceSource": ".labels",
        "MissingLabels": ".labels",
    },
)
