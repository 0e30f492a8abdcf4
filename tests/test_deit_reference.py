"""Our trainer's step against the official DeiT code's, where no statistics are needed.

`deit_reference/official_steps.safetensors` holds five steps of the official loop (DeiT 7e160fe,
timm 0.4.12: `engine.train_one_epoch`, `create_optimizer`, `create_scheduler`, `DistillationLoss`,
`lr_scheduler.step(epoch)` after each epoch), recorded once by `deit_reference/record_official_steps.py`
from inside the official code: the initial weights, the batches and teacher labels, and the loss,
lr and every gradient of each step, for the plain ViT and the hard-distilled one. Here our trainer's
own pieces (`build_model`, `build_optimization`, `build_criterion`, `TeacherTargetBuilder`,
`train_step`, `end_epoch_schedule`) take the same weights and batches: the loss, every gradient,
the lr and the weights after the last step must be the official ones, to float tolerance (another
CPU's arithmetic included: the figures were recorded on one machine and are checked on every one).
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import learned

REFERENCE = Path(__file__).parent / "deit_reference" / "official_steps.safetensors"
# float32 on another CPU's kernels: measured differences are below 1e-6 relative (docs/testing.md)
LOSS_RTOL = 1e-5
GRAD_TOL = dict(rtol=1e-4, atol=1e-7)
WEIGHT_TOL = dict(rtol=1e-4, atol=1e-6)  # 3 AdamW steps at up to 5e-4 a step


def reference() -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(REFERENCE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (safe_open has no iteration)


def official_flags(flags: list[str]) -> dict:
    """main.py's flags of the recording as our TrainConfig's fields."""
    pairs = dict(zip(flags[::2], flags[1::2]))
    names = {"--lr": "lr", "--batch-size": "batch_size", "--epochs": "epochs", "--warmup-epochs": "warmup_epochs",
             "--min-lr": "min_lr", "--warmup-lr": "warmup_lr", "--weight-decay": "weight_decay",
             "--smoothing": "smoothing", "--drop-path": "drop_path", "--mixup": "mixup", "--cutmix": "cutmix",
             "--distillation-alpha": "distillation_alpha"}  # fmt: skip
    return {field: float(pairs[flag]) for flag, field in names.items() if flag in pairs}


def our_run(distilled: bool, fields: dict, arch: dict, steps_per_epoch: int):
    """Our trainer's Run, built by its own factories, for the recorded recipe."""
    from student_trainer.config import TrainConfig
    from student_trainer.targets import TeacherTargetBuilder
    from student_trainer.train import Run, build_criterion, build_model, build_optimization

    fields = {k: int(v) if k in ("batch_size", "epochs", "warmup_epochs") else v for k, v in fields.items()}
    kwargs = {k: arch[k] for k in ("patch_size", "embed_dim", "depth", "num_heads")}
    cfg = TrainConfig(
        shards="unused", out="unused", repeated_aug=1,
        model="deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224", model_kwargs=kwargs,
        labels="store" if distilled else "none", store="unused.db" if distilled else None, **fields,
    )  # fmt: skip
    cpu = torch.device("cpu")
    model, _ = build_model(cfg, 10, arch["img_size"])
    optimizer, scheduler = build_optimization(cfg, model, steps_per_epoch, cfg.batch_size, cpu)
    return Run(
        cfg=cfg, rank=0, world=1, device=cpu, amp="none", out=None, manifest=None, policy=None, model=model,
        net=model, ema=None, val_loader=None, model_meta={}, checkpoint=None, optimizer=optimizer,
        scheduler=scheduler, scaler=torch.amp.GradScaler("cpu", enabled=False), criterion=build_criterion(cfg, None),
        targets=TeacherTargetBuilder(cfg.labels, cfg.on_missing, cfg.distillation_type, 10),
    )  # fmt: skip


def inputs(images: torch.Tensor) -> torch.Tensor:
    """The recording's ToTensor + Normalize of each uint8 image."""
    from PIL import Image
    from torchvision import transforms

    from shards.policy import IMAGENET_MEAN, IMAGENET_STD

    to_input = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return torch.stack([to_input(Image.fromarray(a.numpy())) for a in images])


def train_like_the_recording(name: str, ref: dict, meta: dict) -> dict:
    """Our steps on the recorded weights and batches; what the recording holds, ours."""
    from student_trainer.train import end_epoch_schedule, train_step

    distilled = name == "hard"
    fields = official_flags(json.loads(meta["flags"]))
    run = our_run(distilled, fields, json.loads(meta["arch"]), steps_per_epoch=1)
    init = {k[len(f"{name}.init.") :]: v for k, v in ref.items() if k.startswith(f"{name}.init.")}
    run.model.load_state_dict(init, strict=True)  # the same names in timm 1.0 as in 0.4.12, every one
    x, y, teacher = inputs(ref["images"]), ref["classes"], ref["teacher_labels"]
    batch, out, losses, lrs = int(fields["batch_size"]), {}, [], []
    step_fn = run.optimizer.step

    def recording_step(*a, **kw):
        s = len(lrs)
        lrs.append(run.optimizer.param_groups[0]["lr"])
        out.update({f"grad.{s}.{n}": p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None})
        return step_fn(*a, **kw)

    run.optimizer.step = recording_step
    for epoch in range(int(fields["epochs"])):
        rows = slice(epoch * batch, (epoch + 1) * batch)
        labels = {"teacher_classes": teacher[rows, None], "present": torch.ones(batch, dtype=torch.bool),
                  "teacher_missing": 0}  # fmt: skip
        xb = x[rows]
        losses.append(train_step(run, xb, y[rows], run.targets(labels, xb, None), epoch + 1).item())
        end_epoch_schedule(run, epoch)
    out.update({f"final.{k}": v for k, v in run.model.state_dict().items()})
    out["loss"], out["lr"] = torch.tensor(losses, dtype=torch.float64), torch.tensor(lrs, dtype=torch.float64)
    return out


def key_bias_apart(qkv_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(query and value biases, key bias). The key bias adds the same number to every logit of a
    query's softmax, so its gradient is 0 in exact arithmetic and rounding noise in float32 (the
    gradients agree, to 1e-7); AdamW scales noise to a step of about the lr, of either sign."""
    q, k, v = qkv_bias.chunk(3)
    return torch.cat([q, v]), k


@pytest.mark.unit
@pytest.mark.learning
@pytest.mark.parametrize("name", ["plain", "hard"])
def test_our_steps_are_the_official_steps(name):
    """Plain ViT and hard-distilled ViT: five steps (two in warm-up) of the official loop and ours,
    from the same weights, batches and teacher labels, agree in loss, lr, every gradient and the
    final weights."""
    ref, meta = reference()
    ours = train_like_the_recording(name, ref, meta)
    want = {k[len(name) + 1 :]: v for k, v in ref.items() if k.startswith(f"{name}.") and ".init." not in k}
    want = {k: v for k, v in want.items() if not k.startswith("init.")}
    assert set(ours) == set(want), sorted(set(ours) ^ set(want))  # the same parameters get gradients
    assert ours["lr"].tolist() == pytest.approx(want["lr"].tolist(), rel=1e-12)
    loss_rel = ((ours["loss"] - want["loss"]).abs() / want["loss"].abs()).max().item()
    learned(f"{name}: the loss of five steps, largest relative difference to DeiT's", loss_rel, below=LOSS_RTOL)
    for key in sorted(k for k in want if k.startswith("grad.")):
        torch.testing.assert_close(ours[key], want[key], **GRAD_TOL, msg=lambda m, k=key: f"{k}: {m}")
    moved, weight_diff = 0, 0.0
    for key in sorted(k for k in want if k.startswith("final.")):
        a, b = ours[key], want[key]
        if key.endswith("attn.qkv.bias"):  # its key part: compared to the sum of the steps' lrs, below
            a, b = key_bias_apart(a), key_bias_apart(b)
            assert (a[1] - b[1]).abs().max() <= want["lr"].sum(), key
            a, b = a[0], b[0]
        torch.testing.assert_close(a, b, **WEIGHT_TOL, msg=lambda m, k=key: f"{k}: {m}")
        weight_diff = max(weight_diff, (a - b).abs().max().item())
        moved += not torch.equal(want[key], ref[f"{name}.init.{key[len('final.') :]}"])
    assert moved > 0.9 * len([k for k in want if k.startswith("final.")])  # the steps changed the weights
    learned(f"{name}: weights after five steps, largest difference to DeiT's", weight_diff, below=WEIGHT_TOL["atol"])


@pytest.mark.unit
def test_the_demo_schedule_is_the_official_one():
    """The lr every epoch of the demo's recipe runs at (40 epochs, batch 64, warm-up 2, DeiT's
    epoch stepping and lag), against the official create_scheduler's."""
    from student_trainer.train import end_epoch_schedule

    ref, meta = reference()
    flags = json.loads(meta["demo_flags"])
    run = our_run(False, official_flags(flags), json.loads(meta["arch"]), steps_per_epoch=22)
    lrs = []
    for epoch in range(run.cfg.epochs):
        lrs.append(run.optimizer.param_groups[0]["lr"])
        for step in range(22):  # the per-step hook runs too, as in a real epoch
            run.scheduler.step_update(epoch * 22 + step + 1)
        end_epoch_schedule(run, epoch)
    assert lrs == pytest.approx(ref["demo_lr"].tolist(), rel=1e-12)
