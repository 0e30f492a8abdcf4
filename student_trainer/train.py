"""DeiT student training: set-up, then one loop that reads top to bottom. Directly or under torchrun.

    python -m student_trainer train --shards DIR --labels store --store runs/labels.db --out runs/x
    torchrun --nproc_per_node 2 -m student_trainer train ...

DDP comes from torchrun's environment (timm's set-up: Gloo on CPU, NCCL on CUDA). Every rank gets
the same number of batches from ShardStream, so collectives never hang. Randomness is re-seeded
from (seed, epoch, rank) at the start of every epoch, so a run resumed from a checkpoint draws
the same numbers as one that never stopped. The step does not wait on the device: the loss is
read (and checked) every `--log-every` steps, label accounting is host-side counts from the loader.

A distilled model (timm's deit_*_distilled_*) trained without teacher labels trains its class
head only, as the official DeiT code does; its prediction is then the class head. The paper's
no-distillation baseline is the same ViT without a distillation token (deit_*_patch16_224).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import unwrap_model
from tqdm import tqdm

from distill_core import atomic_save, autocast, load_matching, load_training_checkpoint, save_weights, usable_cpus
from labels.teacher import Teacher
from shards import AugmentPolicy, Manifest
from shards.feeder import Feeder
from shards.stream import images_on_device

from .config import TrainConfig
from .data import LabeledLoader, eval_loader, labeled_loader
from .loss import DistillationLoss
from .targets import MixupWithLambda, TeacherTargetBuilder
from .weights import check_same_model, finetune_from

log = logging.getLogger("student_trainer")

LABEL_COUNTS = ("labels_cached", "labels_missing", "labels_from_service", "labels_service_failed", "labels_unstored")
EPOCH_COUNTS = (*LABEL_COUNTS, "labels_online", "skipped_samples")  # summed over ranks into every epoch's record
# More of a run's labels missing from the store than this share is said loudly, whatever --on-missing
# says: labels a run was promised (a precompute record, a service) and did not get.
MISSING_WARN_SHARE = 0.01


# -- set-up ------------------------------------------------------------------------------------
def setup_distributed() -> tuple[int, int, torch.device]:
    """timm's set-up from torchrun's (or SLURM's) environment: NCCL on CUDA, Gloo on the CPU."""
    from timm.utils.distributed import init_distributed_device_so

    d = init_distributed_device_so(device="cuda" if torch.cuda.is_available() else "cpu")
    return d["global_rank"], d["world_size"], torch.device(d["device"])


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    s = (seed * 1_000_003 + epoch * 1009 + rank) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def all_sum(values: list[float], device) -> list[float]:
    """Sums over ranks (timm's reduce_tensor averages; counts need sums)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def is_distilled(model) -> bool:
    return hasattr(unwrap_model(model), "head_dist")


def build_model(cfg: TrainConfig, num_classes: int, input_size: int):
    import timm

    kwargs = dict(cfg.model_kwargs)
    if ("deit" in cfg.model or "vit" in cfg.model) and "img_size" not in kwargs:
        kwargs["img_size"] = input_size
    model = timm.create_model(cfg.model, num_classes=num_classes, drop_path_rate=cfg.drop_path, **kwargs)
    if cfg.distillation_type != "none" and not is_distilled(model):
        raise ValueError(f"{cfg.model} has no distillation token: use a timm deit_*_distilled_* model")
    if is_distilled(model):
        model.set_distilled_training(True)  # both heads' logits in training
        if cfg.distillation_type == "none":
            # the official code's baseline: the loss sees the class head only. The distillation head
            # gets no gradient; frozen, DDP does not wait for one.
            model.head_dist.requires_grad_(False)
            log.info("%s without distillation: training its class head only", cfg.model)
    return model, kwargs


def build_optimization(cfg: TrainConfig, model, steps_per_epoch: int, global_batch: int, device: torch.device):
    """timm's optimizer and scheduler factories, DeiT's recipe by default (AdamW, cosine with
    warm-up, stepped at each epoch's end in `train`, as DeiT's loop does; step_update is then a
    no-op, timm's t_in_epochs). Learning rates are for a global batch of 512, scaled linearly (the
    warm-up's start and the minimum are not, as in DeiT, unless --scale-min-lr); no weight decay
    on biases, norms and the tokens (timm's filter and the model's no_weight_decay()). The
    schedule ends --cooldown-epochs before --epochs. --no-sched-on-epochs steps it every optimizer
    step instead."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    scale = global_batch / 512
    extra = {"eps": cfg.opt_eps} if cfg.opt_eps is not None else {}  # timm drops it where an optimizer has none
    if device.type == "cuda" and cfg.opt in ("adam", "adamw"):
        extra["fused"] = True
    optimizer = create_optimizer_v2(
        model, opt=cfg.opt, lr=cfg.lr * scale, weight_decay=cfg.weight_decay, momentum=cfg.momentum, **extra
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs - cfg.cooldown_epochs,
        cooldown_epochs=cfg.cooldown_epochs,
        decay_epochs=cfg.decay_epochs,
        decay_rate=cfg.decay_rate,
        min_lr=cfg.min_lr * (scale if cfg.scale_min_lr else 1.0),
        warmup_lr=cfg.warmup_lr,
        warmup_epochs=cfg.warmup_epochs,
        step_on_epochs=cfg.sched_on_epochs,
        updates_per_epoch=steps_per_epoch,
    )
    return optimizer, scheduler


def build_mixup(cfg: TrainConfig, num_classes: int) -> MixupWithLambda | None:
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return MixupWithLambda(
        num_classes, cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob, label_smoothing=cfg.smoothing
    )


def build_criterion(cfg: TrainConfig, mixup: MixupWithLambda | None) -> DistillationLoss:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup is not None:
        base = SoftTargetCrossEntropy()  # mixup's targets are smoothed distributions
    elif cfg.smoothing:
        base = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        base = torch.nn.CrossEntropyLoss()
    return DistillationLoss(base, cfg.distillation_type, cfg.distillation_alpha, cfg.distillation_tau)


@dataclass
class Run:
    """What the loop works with; built once by `setup`. With --eval, only what evaluation needs:
    the training parts (loader, optimizer, ...) are None."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    amp: str
    out: Path | None
    manifest: Manifest
    policy: AugmentPolicy
    model: torch.nn.Module  # the model itself: checkpoints and export
    net: torch.nn.Module  # what runs the step: DDP- and/or compile-wrapped model
    ema: object | None  # timm's ModelEmaV3 (--model-ema): its .module is the averaged model
    val_loader: torch.utils.data.DataLoader | None
    model_meta: dict
    checkpoint: dict | None  # what --resume names, read once (its weights loaded by load_checkpoint)
    checkpoint_path: Path | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    scaler: torch.amp.GradScaler | None = None
    criterion: DistillationLoss | None = None
    mixup: MixupWithLambda | None = None
    targets: TeacherTargetBuilder | None = None
    loader: LabeledLoader | None = None  # the train split's batches with their teacher labels (data.py)
    steps_per_epoch: int = 0
    namespace: str | None = None
    writer: object = None  # TensorBoard's SummaryWriter (--tensorboard, rank 0)
    started_from: dict = field(default_factory=dict)  # what --finetune adapted
    counts: dict = field(default_factory=lambda: dict.fromkeys(EPOCH_COUNTS, 0))

    @property
    def main(self) -> bool:
        return self.rank == 0


def resume_path(cfg: TrainConfig) -> Path | None:
    """The checkpoint --resume names: a path, or OUT/last.pt when it exists ('auto')."""
    if cfg.resume == "auto":
        path = Path(cfg.out) / "last.pt"
        if not path.exists() and cfg.eval:
            raise FileNotFoundError(f"--eval --resume auto: there is no {path}")
        return path if path.exists() else None
    if cfg.resume and not Path(cfg.resume).exists():
        raise FileNotFoundError(f"--resume {cfg.resume}: no such checkpoint")
    return Path(cfg.resume) if cfg.resume else None


def model_of_checkpoint(cfg: TrainConfig, ckpt: dict) -> TrainConfig:
    """--eval: the checkpoint's model and model kwargs, unless the command line names them."""
    meta = ckpt.get("model_meta") or {}
    update = {}
    if "model" in meta and "model" not in cfg.model_fields_set:
        update["model"] = meta["model"]
    if "model_kwargs" in meta and "model_kwargs" not in cfg.model_fields_set:
        update["model_kwargs"] = {k: v for k, v in meta["model_kwargs"].items() if k != "img_size"}
    return cfg.model_copy(update=update)


def open_tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(
            "--tensorboard needs the tensorboard package: pip install tensorboard (or this package's "
            "[tensorboard] extra)"
        ) from None
    return SummaryWriter(str(out / "tensorboard"))


def setup(cfg: TrainConfig) -> Run:
    rank, world, device = setup_distributed()
    checkpoint_path = resume_path(cfg)
    checkpoint = load_training_checkpoint(checkpoint_path) if checkpoint_path else None
    if cfg.eval:
        cfg = model_of_checkpoint(cfg, checkpoint)
    out = Path(cfg.out) if cfg.out else None
    if rank == 0 and out is not None and not cfg.eval:
        out.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, usable_cpus() // world))
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    manifest = Manifest.load(cfg.shards)
    policy = cfg.augment_policy(manifest)
    num_classes = len(manifest.classes)
    if cfg.eval and "val" not in manifest.splits:
        raise ValueError(f"--eval: {cfg.shards} has no val split (shards build --val-src or --val-fraction)")

    seed_epoch(cfg.seed, 0, 0)  # the same initial weights on every rank (DDP also broadcasts them)
    model, model_kwargs = build_model(cfg, num_classes, policy.input_size)
    model.to(device)
    ema = None
    if (cfg.model_ema and not cfg.eval) or (cfg.eval and "model_ema" in checkpoint):
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.model_ema_decay)  # a copy of the model, on its device
    data = {"rank": rank, "world_size": world, "device": device, "manifest": manifest, "policy": policy}
    val_loader = None
    if "val" in manifest.splits and (cfg.eval or cfg.eval_every):
        val_loader = eval_loader(cfg, "val", **data)
    run = Run(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        amp=amp,
        out=out,
        manifest=manifest,
        policy=policy,
        model=model,
        net=model,
        ema=ema,
        val_loader=val_loader,
        model_meta={
            "model": cfg.model,
            "model_kwargs": model_kwargs,
            "num_classes": num_classes,
            "classes": manifest.classes,
        },
        checkpoint=checkpoint,
        checkpoint_path=checkpoint_path,
    )
    if not cfg.eval:
        add_training(run, data)
    return run


def add_training(run: Run, data: dict) -> None:
    """What training needs beyond evaluation: the train loader with its teacher labels (every rank
    the same number of batches; labels fetched in the loader workers, data.py; a torch policy on an
    accelerator: the workers decode and draw, the device renders), the targets (and an online
    teacher), DeiT's optimizer, schedule and loss, DDP and torch.compile, TensorBoard."""
    cfg, device, num_classes = run.cfg, run.device, run.model_meta["num_classes"]
    run.loader = labeled_loader(cfg, soft=cfg.distillation_type == "soft", **data)
    run.namespace = run.loader.namespace
    teacher = None
    if cfg.needs_teacher:
        settings = cfg.teacher
        if settings.random_init and settings.num_classes is None:
            settings = settings.model_copy(update={"num_classes": num_classes})
        teacher = Teacher(settings, device=str(device))
        if cfg.compile:
            teacher.compile()
    run.targets = TeacherTargetBuilder(cfg.labels, cfg.on_missing, cfg.distillation_type, num_classes, teacher)
    run.steps_per_epoch = len(run.loader)
    global_batch = cfg.batch_size * run.world
    run.optimizer, run.scheduler = build_optimization(cfg, run.model, run.steps_per_epoch, global_batch, device)
    run.scaler = torch.amp.GradScaler(device.type, enabled=run.amp == "fp16")
    run.mixup = build_mixup(cfg, num_classes)
    run.criterion = build_criterion(cfg, run.mixup)
    if run.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        run.net = torch.nn.parallel.DistributedDataParallel(run.model, device_ids=ids)
    if cfg.compile:
        run.net = torch.compile(run.net)
    if cfg.tensorboard and run.main:
        run.writer = open_tensorboard(run.out)


# -- checkpoints --------------------------------------------------------------------------------
def save_checkpoint(run: Run, epoch: int, step: int) -> None:
    """OUT/last.pt, atomically; plain values only, so resuming loads it with weights_only=True."""
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": epoch,
        "step": step,
        "config": run.cfg.model_dump(),
        "model_meta": run.model_meta,
    }
    if run.ema is not None:
        state["model_ema"] = run.ema.module.state_dict()
    atomic_save(state, run.out / "last.pt")


def load_checkpoint(run: Run) -> tuple[int, int]:
    """Load what the run starts from; returns the (first epoch, step) to continue from. A --resume
    checkpoint restores everything (it must be this run's architecture); without one, --finetune
    loads its weights (weights.py); else the run starts fresh at (0, 0)."""
    cfg, ckpt = run.cfg, run.checkpoint
    if ckpt is None:
        if cfg.finetune:
            run.started_from = finetune_from(run.model, cfg.finetune, cfg.model, run.model_meta["model_kwargs"])
            if run.ema is not None:
                run.ema.set(run.model)  # the average starts from the fine-tuned weights
        return 0, 0
    what = f"--resume {run.checkpoint_path}"
    check_same_model(ckpt.get("model_meta") or {}, cfg.model, run.model_meta["model_kwargs"], what)
    load_matching(run.model, ckpt["model"], what)
    if run.ema is not None:
        if "model_ema" in ckpt:
            load_matching(run.ema.module, ckpt["model_ema"], f"{what} (its EMA)")
        else:
            log.warning("%s has no EMA weights: --model-ema starts from its model weights", what)
            run.ema.set(run.model)
    if run.optimizer is not None:
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            run.scaler.load_state_dict(ckpt["scaler"])
    if run.main and not cfg.eval:
        log.info("resumed from %s: epoch %d, step %d", run.checkpoint_path, ckpt["epoch"] + 1, ckpt["step"])
    return ckpt["epoch"] + 1, ckpt["step"]


def export(run: Run) -> None:
    """OUT/model.safetensors (and model_ema.safetensors) with the metadata that rebuilds the model:
    loadable as a teacher, by --finetune, or by timm."""
    save_weights(run.model.state_dict(), run.out / "model.safetensors", run.model_meta)
    if run.ema is not None:
        save_weights(run.ema.module.state_dict(), run.out / "model_ema.safetensors", run.model_meta)


# -- the loop -----------------------------------------------------------------------------------
def train_step(run: Run, x: torch.Tensor, y, targets, step: int) -> torch.Tensor:
    """One optimizer step of DeiT's loop (its engine.train_one_epoch body): forward, the loss in
    float32, backward, clipping, the step, the per-step schedule (a no-op when it steps on epochs)
    and the EMA; `step` counts from 1. Returns the loss, on the device (not read: no host sync).
    tests/test_deit_reference.py checks it against the official code's steps."""
    with autocast(run.device, run.amp):
        outputs = run.net(x)
    # the losses in float32, whatever the forward ran in
    outputs = tuple(o.float() for o in outputs) if isinstance(outputs, tuple) else outputs.float()
    loss = run.criterion(outputs, y, targets)

    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.cfg.clip_grad:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step_update(step)
    if run.ema is not None:
        run.ema.update(run.model, step=step)
    return loss


def end_epoch_schedule(run: Run, epoch: int) -> None:
    """DeiT's main.py steps the schedule after each epoch with that epoch's index, so epoch e + 1
    runs at the schedule's value for e (warm-up epochs 0 and 1 both at --warmup-lr)."""
    if run.cfg.sched_on_epochs:
        run.scheduler.step(epoch)


def train_one_epoch(run: Run, epoch: int, step: int, max_steps: int) -> tuple[int, dict]:
    """One epoch (or up to max_steps); returns the step reached and the epoch's figures (all ranks)."""
    cfg, device = run.cfg, run.device
    run.net.train()
    loss_sum = torch.zeros((), device=device)
    images = n_steps = 0
    counts = dict.fromkeys(EPOCH_COUNTS, 0)  # this rank's, this epoch's
    online_before = run.targets.labels_online
    first_step_done = None  # (time, images) after the first step: the steady-state clock starts there
    t0 = time.perf_counter()

    # batch k+1 is copied and rendered on a stream of its own while batch k trains (on CUDA)
    def to_device(b: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return images_on_device(b, run.policy, device), b["label"].to(device, non_blocking=True)

    feed = Feeder(run.loader, to_device, device)
    bar = tqdm(
        feed,
        total=run.steps_per_epoch,
        desc=f"epoch {epoch}",
        disable=not (run.main and cfg.progress),
        unit="batch",
        leave=False,
    )
    for batch, (x, y) in bar:
        counts["skipped_samples"] += batch["skipped"]
        for k, v in batch.get("label_stats", {}).items():
            counts[k] += v
        lam = None
        if run.mixup is not None:
            x, y, lam = run.mixup(x, y)
        step += 1
        loss = train_step(run, x, y, run.targets(batch, x, lam), step)
        loss_sum += loss.detach()
        images += len(x)
        n_steps += 1
        if first_step_done is None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            first_step_done = (time.perf_counter(), images)
        if step % cfg.log_every == 0:  # the step's only host sync, nanoGPT-style
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at epoch {epoch} step {step}")
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}")
        if max_steps and step >= max_steps:
            break
    feed.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    loss_total = loss_sum.item()
    if not math.isfinite(loss_total):
        raise FloatingPointError(f"loss is {loss_total} in epoch {epoch}")
    steady_images = images - first_step_done[1] if first_step_done else 0
    steady_seconds = end - first_step_done[0] if first_step_done else 0.0
    counts["labels_online"] = run.targets.labels_online - online_before
    g_images, g_loss, g_steps, g_steady, *g_counts = all_sum(
        [images, loss_total, n_steps, steady_images, *counts.values()], device
    )
    return step, {
        "epoch": epoch,
        "step": step,
        "train_loss": g_loss / max(g_steps, 1),
        "lr": run.optimizer.param_groups[0]["lr"],
        "images": int(g_images),
        "images_per_s": g_images / (end - t0),
        "steady_images": int(g_steady),  # all ranks' images after each one's first step of the epoch
        "steady_seconds": steady_seconds,
        "epoch_seconds": end - t0,
        **{k: int(v) for k, v in zip(counts, g_counts)},
    }


@torch.no_grad()
def evaluate(model, loader, device: torch.device, amp: str, distilled_training: bool) -> dict:
    """Top-1 of the class head, the distillation head and the fused prediction: the model's own
    eval-mode output, the two heads' logits averaged, as DeiT and timm compute it
    (`val_top1_fused_probs`: the two softmaxes averaged, this trainer's figure before
    2026-12-05); `val_top1` is the model's prediction: fused when it was trained with
    distillation, else its class head (a plain ViT has only that)."""
    model.eval()
    n = c_cls = c_dist = c_fused = c_probs = 0
    for batch in loader:
        x, y = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        with autocast(device, amp):
            m = unwrap_model(model)
            if is_distilled(m):
                f = m.forward_features(x)
                cls, dst = m.head(f[:, 0]).float(), m.head_dist(f[:, 1]).float()
            else:
                cls = dst = m(x).float()
        n += len(y)
        c_cls += (cls.argmax(1) == y).sum()
        c_dist += (dst.argmax(1) == y).sum()
        c_fused += ((cls + dst).argmax(1) == y).sum()
        c_probs += ((cls.softmax(1) + dst.softmax(1)).argmax(1) == y).sum()
    n, c_cls, c_dist, c_fused, c_probs = all_sum([n, int(c_cls), int(c_dist), int(c_fused), int(c_probs)], device)
    out = {
        "val_top1_cls": 100 * c_cls / n,
        "val_top1_dist": 100 * c_dist / n,
        "val_top1_fused": 100 * c_fused / n,
        "val_top1_fused_probs": 100 * c_probs / n,
        "val_images": int(n),
    }
    out["val_top1"] = out["val_top1_fused"] if distilled_training else out["val_top1_cls"]
    return out


def evaluate_run(run: Run, distilled_training: bool) -> dict:
    """`evaluate` of the model, and of its EMA (figures prefixed `ema_`)."""
    figures = evaluate(run.net, run.val_loader, run.device, run.amp, distilled_training)
    if run.ema is not None:
        ema = evaluate(run.ema.module, run.val_loader, run.device, run.amp, distilled_training)
        figures.update({f"ema_{k}": v for k, v in ema.items() if k != "val_images"})
    return figures


def rounded(figures: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}


def evaluate_checkpoint(run: Run) -> dict:
    """--eval: top-1 of the checkpoint's class head, distillation head and fused prediction (and
    its EMA's), on the val split, without training; `val_top1` is the prediction it was trained for."""
    epoch, step = load_checkpoint(run)
    distilled = (run.checkpoint.get("config") or {}).get("distillation_type", "none") != "none"
    summary = {
        "eval": str(run.checkpoint_path),
        "model": run.cfg.model,
        "epochs_trained": epoch,
        "steps": step,
        "distilled": distilled,
        "policy_id": run.policy.policy_id,
        **rounded(evaluate_run(run, distilled)),
    }
    shutdown(run)
    return summary if run.main else {}


def train(cfg: TrainConfig) -> dict:
    run = setup(cfg)
    if cfg.eval:
        return evaluate_checkpoint(run)
    start_epoch, step = load_checkpoint(run)
    total_images = total_seconds = steady_images = steady_seconds = 0.0
    last_eval: dict = {}
    epoch, done = start_epoch - 1, False
    for epoch in range(start_epoch, cfg.epochs):
        seed_epoch(cfg.seed, epoch, run.rank)
        run.loader.set_epoch(epoch)  # before iter(loader): persistent workers read it at the epoch's start
        step, record = train_one_epoch(run, epoch, step, cfg.max_steps)
        end_epoch_schedule(run, epoch)
        done = bool(cfg.max_steps) and step >= cfg.max_steps
        total_images += record["images"]
        total_seconds += record["epoch_seconds"]
        steady_images += record["steady_images"]
        steady_seconds += record["steady_seconds"]
        for k in EPOCH_COUNTS:
            run.counts[k] += record[k]
        last_epoch = epoch + 1 == cfg.epochs or done
        if run.val_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or last_epoch):
            last_eval = evaluate_run(run, cfg.distillation_type != "none")
            record.update(last_eval)
        if run.main:
            # checkpoint first: an epoch's metrics line then never exists without its checkpoint, so a
            # run killed in between resumes without writing that epoch's line twice
            if cfg.checkpoint_every and ((epoch + 1) % cfg.checkpoint_every == 0 or last_epoch):
                save_checkpoint(run, epoch, step)
            with open(run.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if run.writer is not None:  # the same figures, as TensorBoard scalars by epoch
                for k, v in record.items():
                    if k != "epoch" and isinstance(v, int | float):
                        run.writer.add_scalar(k, v, epoch)
                run.writer.flush()
            if cfg.progress:
                tqdm.write(json.dumps(rounded(record)))
        if dist.is_initialized():
            dist.barrier()
        if done:
            break

    counts = run.counts
    warning = missing_labels_warning(counts, cfg.on_missing)
    if warning and run.main:
        log.warning(warning)
    if run.main and cfg.export:
        export(run)
    if run.writer is not None:
        run.writer.close()
    summary = {
        "model": cfg.model,
        "labels": cfg.labels,
        "distillation_type": cfg.distillation_type,
        "world_size": run.world,
        "global_batch": cfg.batch_size * run.world,
        "namespace": run.namespace,
        "policy_id": run.policy.policy_id,
        "repeat_mode": cfg.repeat_mode,
        "seeds_needed": f"0:{run.loader.schedule.seed_limit_for_run(cfg.epochs)}",
        "labels_needed": run.loader.schedule.labels_for_run(cfg.epochs),
        "epochs_done": max(epoch + 1, start_epoch),
        "steps": step,
        "images_per_s": round(total_images / total_seconds, 2) if total_seconds else None,
        "steady_images_per_s": round(steady_images / steady_seconds, 2) if steady_seconds else None,
        **{k: int(v) for k, v in counts.items()},
        **({"warning": warning} if warning else {}),
        **({"started_from": run.started_from} if run.started_from else {}),
        **rounded(last_eval),
        "out": str(run.out),
    }
    shutdown(run)
    return summary if run.main else {}


def missing_labels_warning(counts: dict, on_missing: str) -> str | None:
    """What a run whose store missed more than MISSING_WARN_SHARE of its labels must say."""
    asked = counts.get("labels_cached", 0) + counts.get("labels_missing", 0)
    missing = counts.get("labels_missing", 0)
    if not asked or missing / asked <= MISSING_WARN_SHARE:
        return None
    then = {
        "skip": "the distillation head trained without them",
        "online": "the online teacher labeled them",
        "service": f"the service labeled {int(counts.get('labels_from_service', 0))} of them",
    }.get(on_missing, "")
    return (
        f"{int(missing)} of {int(asked)} teacher labels ({100 * missing / asked:.1f}%) were not in the store "
        f"(more than {100 * MISSING_WARN_SHARE:g}%): {then}; precompute them, or check what the store's "
        "precompute records claim (`labels stats`)"
    )


def shutdown(run: Run) -> None:
    """DDP's reducer holds Gloo/NCCL work: release it and let every rank arrive before the group
    goes, or a rank can abort at interpreter exit ("terminate called without an active exception")."""
    if not dist.is_initialized():
        return
    import gc

    run.net = run.loader = run.val_loader = run.ema = None
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
