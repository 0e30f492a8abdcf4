"""The DeiT student: configuration, the DDP training loop, DeiT's loss and where teacher labels
come from (a store, the service, an online teacher).

    from student_trainer import TrainConfig
    from student_trainer.train import train
    summary = train(TrainConfig(shards="runs/demo/shards", out="runs/x", labels="store", store="runs/demo/labels.db"))

Cached labels in a training loop of your own (`data.py`, `targets.py`, `loss.py`):

    from student_trainer import DataConfig, DistillationLoss, labeled_loader, teacher_targets
    cfg = DataConfig(shards="runs/demo/shards", labels="store", store="runs/demo/labels.db", epochs=30, batch_size=64)
    loader = labeled_loader(cfg)
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), "hard", alpha=0.5)
    for epoch in range(cfg.epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            loss = criterion(model(batch["image"]), batch["label"], teacher_targets(batch, num_classes))

Names are imported on first use (a data-loader worker needs the label sources, not the loop). The
function `train` is reached through its module of the same name.
"""

from __future__ import annotations

from distill_core import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "TrainConfig": ".config",
        "DataConfig": ".config",
        "DistillationLoss": ".loss",
        "TeacherTargets": ".loss",
        "labeled_loader": ".data",
        "eval_loader": ".data",
        "LabeledLoader": ".data",
        "LabeledStream": ".data",
        "StoreSource": ".data",
        "ServiceSource": ".data",
        "MissingLabels": ".data",
        "teacher_targets": ".targets",
        "target_distribution": ".targets",
        "MixupWithLambda": ".targets",
    },
)
