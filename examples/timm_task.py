"""Cached teacher labels in timm's training-task API: timm's token distillation, its teacher's
forward replaced by the labels each batch carries.

timm's own `train.py` cannot take them as they are: it builds its loader from `--data-dir` with
its own unseeded augmentation, so the crops it trains on are not the crops the labels were made
for, and its `--kd-model-name` options run the teacher at every step. So the loader is ours
(`labeled_loader`: the seeded crops the labels belong to) and the task is the small adapter
below; model, optimizer, scheduler, mixup and loss are timm's.

    python examples/timm_task.py --shards runs/demo/shards --labels runs/demo/labels.db --epochs 2
"""

import json

import torch
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.task import TrainingTask
from timm.utils import unwrap_model

from shards import Manifest
from student_trainer import DistillationLoss, MixupWithLambda, TeacherTargets, labeled_loader, teacher_targets

from common import data_config, parse_args, small_deit


class CachedTokenDistillationTask(TrainingTask):
    """timm's TokenDistillationTask with the teacher's logits replaced by cached targets:
    loss = task_loss_weight * task + (1 - task_loss_weight) * distill, DeiT's formula."""

    def __init__(self, student, criterion, distill_type="hard", task_loss_weight=0.5, device=None):
        super().__init__(device=device)
        unwrap_model(student).set_distilled_training(True)  # forward -> (class head, distillation head)
        self.trainable_module = student
        self.loss = DistillationLoss(criterion, distill_type, alpha=1.0 - task_loss_weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor, teacher: TeacherTargets) -> dict:
        main_logits, dist_logits = self.trainable_module(input)
        return {"loss": self.loss((main_logits, dist_logits), target, teacher), "output": main_logits}


args = parse_args(__doc__)

torch.manual_seed(0)
num_classes = len(Manifest.load(args.shards).classes)
loader = labeled_loader(data_config(args))
model = small_deit(num_classes, loader.policy.input_size, drop_path_rate=0.1)
task = CachedTokenDistillationTask(model, SoftTargetCrossEntropy(), "hard", task_loss_weight=0.5)
optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
steps = args.epochs * len(loader)
scheduler = CosineLRScheduler(optimizer, t_initial=steps, warmup_t=steps // 10, warmup_lr_init=1e-6, t_in_epochs=False)
mixup = MixupWithLambda(num_classes)  # timm's Mixup/CutMix, with its lambda for the teacher targets

step, losses = 0, []
task.train()
for epoch in range(args.epochs):
    loader.set_epoch(epoch)
    for batch in loader:
        x, y, lam = mixup(batch["image"], batch["label"])
        result = task(x, y, teacher_targets(batch, num_classes, lam, n=len(x)))  # mixed as the images
        optimizer.zero_grad(set_to_none=True)
        result["loss"].backward()
        optimizer.step()
        step += 1
        scheduler.step_update(step)
        losses.append(result["loss"].item())
        if step == args.steps:
            break
    if step == args.steps:
        break
print(json.dumps({"steps": step, "namespace": loader.namespace, "first_loss": round(losses[0], 4),
                  "last_loss": round(sum(losses[-5:]) / len(losses[-5:]), 4)}))  # fmt: skip
