"""Train a timm distilled ViT from cached teacher labels in a plain PyTorch loop (DeiT's hard distillation).

    python -m shards build --demo digits --out runs/demo/shards
    python -m teacher_service precompute --shards runs/demo/shards --store runs/demo/labels.db \
        --epochs 2 --repeated-aug 3 --checkpoint TEACHER.safetensors
    python examples/plain_loop.py --shards runs/demo/shards --labels runs/demo/labels.db --epochs 2
"""

import argparse
import json

import timm
import torch

from shards import Manifest
from student_trainer import DistillationLoss, labeled_loader, teacher_targets

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--shards", required=True, help="shard directory (python -m shards build)")
p.add_argument("--labels", required=True, help="label store (file path, redis://) or teacher service (http://)")
p.add_argument("--epochs", type=int, default=2, help="epochs (the labels must cover them)")
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: every epoch)")
p.add_argument("--workers", type=int, default=2, help="data-loader workers (they fetch the labels)")
args = p.parse_args()

torch.manual_seed(0)
num_classes = len(Manifest.load(args.shards).classes)
loader = labeled_loader(args.shards, args.labels, epochs=args.epochs, batch_size=args.batch_size, workers=args.workers)
model = timm.create_model(  # DeiT-Ti's layout, shrunk for 32 px digits
    "deit_tiny_distilled_patch16_224", num_classes=num_classes, img_size=loader.policy.input_size,
    patch_size=4, embed_dim=96, depth=4, num_heads=3,
)  # fmt: skip
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
