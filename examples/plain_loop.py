"""Train a timm distilled ViT from cached teacher labels in a plain PyTorch loop (DeiT's hard distillation).

    python -m shards build --demo digits --out runs/demo/shards
    python -m teacher_service precompute --shards runs/demo/shards --store runs/demo/labels.db \
        --epochs 2 --repeated-aug 3 --checkpoint TEACHER.safetensors
    python examples/plain_loop.py --shards runs/demo/shards --labels runs/demo/labels.db --epochs 2
"""

import json

import torch

from shards import Manifest
from student_trainer import DistillationLoss, labeled_loader, teacher_targets

from common import data_config, parse_args, small_deit

args = parse_args(__doc__)

torch.manual_seed(0)
num_classes = len(Manifest.load(args.shards).classes)
loader = labeled_loader(data_config(args))
model = small_deit(num_classes, loader.policy.input_size)
model.set_distilled_training(True)  # forward returns (class head, distillation head) logits
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), "hard", alpha=0.5)

step, losses, agree, seen = 0, [], 0, 0
for epoch in range(args.epochs):
    loader.set_epoch(epoch)  # the epoch's images and seeds: those precompute labeled
    for batch in loader:
        x, y = batch["image"], batch["label"]
        outputs = model(x)
        loss = criterion(outputs, y, teacher_targets(batch, num_classes))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(loss.item())
        present = batch["present"]
        agree += int((outputs[1].argmax(1) == batch["teacher_label"])[present].sum())
        seen += int(present.sum())
        if step == args.steps:
            break
    if step == args.steps:
        break

print(json.dumps({
    "steps": step, "namespace": loader.namespace, "labels_used": seen,
    "first_loss": round(losses[0], 4), "last_loss": round(sum(losses[-5:]) / len(losses[-5:]), 4),
    "dist_head_agrees_with_teacher": round(agree / max(seen, 1), 4),
}))  # fmt: skip
