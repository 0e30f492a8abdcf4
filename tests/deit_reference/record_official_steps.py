"""Records a few training steps of the official DeiT code, for `tests/test_deit_reference.py`.

The figures the test compares against come from this script run once inside the official code
(facebookresearch/deit at 7e160fe, timm 0.4.12); the test itself never imports it. Run it from a
checkout of that commit, with timm 0.4.12 first on the path:

    cd DEIT_CHECKOUT && PYTHONPATH=OLD_TIMM:. python RECORD official_steps.safetensors

What runs is the official loop: `main.get_args_parser` for the recipe's flags (DeiT's defaults,
except the few below), `create_optimizer` and `create_scheduler` of timm 0.4.12 as `main.py` calls
them, `engine.train_one_epoch` for every epoch and `lr_scheduler.step(epoch)` after it. The data are
scikit-learn's digits at 32 px, one batch of 8 an epoch, so five epochs are five optimizer steps,
two of them in warm-up. The models are the official small ViTs (width 16, depth 2, patch 4): timm
0.4.12's `VisionTransformer` (plain) and DeiT's `DistilledVisionTransformer`. The teacher's hard
labels are fixed (the true class for even rows, the next class for odd ones), given to the
official `DistillationLoss` as one-hot logits: it uses only their argmax.

Stored: the uint8 images, classes and teacher labels of every step; per model, its initial weights,
every gradient and the lr of every step, the loss of every step and the weights after the last.
The lr of DeiT's demo recipe at every epoch (40 epochs) is stored too, for the schedule test.
"""

import json
import sys
from functools import partial

import engine  # the official DeiT modules: run from the checkout
import main as deit_main
import numpy as np
import timm
import torch
from losses import DistillationLoss
from models import DistilledVisionTransformer
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn
from torchvision import transforms

assert timm.__version__ == "0.4.12", timm.__version__
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from timm.optim import create_optimizer  # noqa: E402
from timm.scheduler import create_scheduler  # noqa: E402
from timm.utils import NativeScaler  # noqa: E402

STEPS, BATCH, CLASSES = 5, 8, 10
ARCH = dict(img_size=32, patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=4, qkv_bias=True)
# main.py's flags for this recipe; everything else is DeiT's default
FLAGS = ["--lr", "5e-2", "--batch-size", str(BATCH), "--epochs", str(STEPS), "--warmup-epochs", "2",
         "--min-lr", "1e-5", "--warmup-lr", "1e-6", "--weight-decay", "0.05", "--smoothing", "0.1",
         "--drop-path", "0", "--mixup", "0", "--cutmix", "0", "--distillation-alpha", "0.5",
         "--device", "cpu"]  # fmt: skip
DEMO_FLAGS = ["--lr", "1.6e-2", "--batch-size", "64", "--epochs", "40", "--warmup-epochs", "2",
              "--min-lr", "1e-5", "--warmup-lr", "1e-6"]  # fmt: skip


def images() -> tuple[torch.Tensor, torch.Tensor]:
    """STEPS * BATCH digits as uint8 [N, 32, 32, 3] and their classes."""
    d = load_digits()
    u8 = (d.images[: STEPS * BATCH] * (255 / 16)).round().astype(np.uint8)
    big = [np.asarray(Image.fromarray(a).resize((32, 32), Image.BICUBIC).convert("RGB")) for a in u8]
    return torch.from_numpy(np.stack(big)), torch.from_numpy(d.target[: STEPS * BATCH]).long()


class FixedTeacher(nn.Module):
    """Hands DistillationLoss one-hot logits of the given labels, one batch per call."""

    def __init__(self, labels: torch.Tensor):
        super().__init__()
        self.labels, self.calls = labels, 0

    def forward(self, x):
        rows = self.labels[self.calls * BATCH : (self.calls + 1) * BATCH]
        self.calls += 1
        return nn.functional.one_hot(rows, CLASSES).float()


def record(distilled: bool, x: torch.Tensor, y: torch.Tensor, teacher_labels: torch.Tensor) -> dict:
    args = deit_main.get_args_parser().parse_args(
        [*FLAGS, "--distillation-type", "hard" if distilled else "none", "--teacher-path", "unused"]
    )
    args.lr = args.lr * args.batch_size / 512.0  # main.py: linear_scaled_lr, one process
    torch.manual_seed(0)
    norm = partial(nn.LayerNorm, eps=1e-6)
    model = (DistilledVisionTransformer if distilled else VisionTransformer)(
        num_classes=CLASSES, norm_layer=norm, **ARCH
    )
    init = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = create_optimizer(args, model)
    lr_scheduler, _ = create_scheduler(args, optimizer)
    base = timm.loss.LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    teacher = FixedTeacher(teacher_labels) if distilled else None
    criterion = DistillationLoss(base, teacher, args.distillation_type, args.distillation_alpha, args.distillation_tau)
    out, losses, lrs = {f"init.{k}": v for k, v in init.items()}, [], []

    step_fn = optimizer.step

    def recording_step(*a, **kw):  # every gradient and the lr, as the optimizer sees them
        s = len(lrs)
        lrs.append(optimizer.param_groups[0]["lr"])
        for name, p in model.named_parameters():
            if p.grad is not None:
                out[f"grad.{s}.{name}"] = p.grad.detach().clone()
        return step_fn(*a, **kw)

    optimizer.step = recording_step
    loss_fn = criterion.forward

    def recording_loss(inputs, outputs, labels):
        loss = loss_fn(inputs, outputs, labels)
        losses.append(loss.item())
        return loss

    criterion.forward = recording_loss
    for epoch in range(STEPS):
        batch = [(x[epoch * BATCH : (epoch + 1) * BATCH], y[epoch * BATCH : (epoch + 1) * BATCH])]
        engine.train_one_epoch(model, criterion, batch, optimizer, torch.device("cpu"), epoch, NativeScaler(),
                               args.clip_grad, None, None, set_training_mode=True, args=args)  # fmt: skip
        lr_scheduler.step(epoch)
    out.update({f"final.{k}": v.clone() for k, v in model.state_dict().items()})
    out["loss"] = torch.tensor(losses, dtype=torch.float64)
    out["lr"] = torch.tensor(lrs, dtype=torch.float64)
    return out


def demo_schedule() -> list[float]:
    """The lr each epoch of DeiT's demo recipe runs at (40 epochs, batch 64), from create_scheduler."""
    args = deit_main.get_args_parser().parse_args(DEMO_FLAGS)
    args.lr = args.lr * args.batch_size / 512.0
    optimizer = create_optimizer(args, nn.Linear(2, 2))
    lr_scheduler, _ = create_scheduler(args, optimizer)
    lrs = []
    for epoch in range(args.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        lr_scheduler.step(epoch)
    return lrs


if __name__ == "__main__":
    u8, y = images()
    to_input = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)]
    )
    x = torch.stack([to_input(Image.fromarray(a.numpy())) for a in u8])
    teacher_labels = torch.where(torch.arange(len(y)) % 2 == 0, y, (y + 1) % CLASSES)
    tensors = {"images": u8, "classes": y, "teacher_labels": teacher_labels,
               "demo_lr": torch.tensor(demo_schedule(), dtype=torch.float64)}  # fmt: skip
    for name, distilled in (("plain", False), ("hard", True)):
        tensors.update({f"{name}.{k}": v for k, v in record(distilled, x, y, teacher_labels).items()})
    meta = {"deit": "facebookresearch/deit 7e160fe", "timm": timm.__version__, "torch": torch.__version__,
            "flags": json.dumps(FLAGS), "demo_flags": json.dumps(DEMO_FLAGS), "arch": json.dumps(ARCH)}  # fmt: skip
    save_file({k: v.contiguous() for k, v in tensors.items()}, sys.argv[1], metadata=meta)
    print(json.dumps({"saved": sys.argv[1], "tensors": len(tensors), "plain_loss": tensors["plain.loss"].tolist(),
                      "hard_loss": tensors["hard.loss"].tolist(), "lr": tensors["hard.lr"].tolist()}))  # fmt: skip
