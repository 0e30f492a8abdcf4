"""DeiT student training: one loop, top to bottom. Run directly or under torchrun.

    python -m student_trainer train --shards DIR --labels store --store runs/labels.db --out runs/x
    torchrun --nproc_per_node 2 -m student_trainer train ...

DDP comes from torchrun's environment (Gloo on CPU, NCCL on CUDA). Every rank gets the same
number of batches from ShardStream, so collectives never hang. Randomness is re-seeded from
(seed, epoch, rank) at the start of every epoch, so a run resumed from a checkpoint draws the same
numbers as one that never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import unwrap_model
from tqdm import tqdm

from distill_core import atomic_save, load_training_checkpoint, save_weights
from shards import Manifest, ShardStream, make_loader, seeds_for_run
from teacher_service.teacher import Teacher

from .config import TrainConfig
from .labels import LabeledStream, ServiceSource, StoreSource, check_compatible, target_distribution
from .loss import DistillationLoss, TeacherTargets

log = logging.getLogger("student_trainer")


# --------------------------------------------------------------------------------------------
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


def heads(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class-head and distillation-head logits (eval), for timm's VisionTransformerDistilled."""
    m = unwrap_model(model)
    if not is_distilled(m):
        return m(x), None
    f = m.forward_features(x)
    return m.head(f[:, 0]), m.head_dist(f[:, 1])


def autocast(device, amp: str):
    if device.type != "cuda" or amp == "none":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


@torch.no_grad()
def evaluate(model, loader, device, amp: str) -> dict:
    model.eval()
    n = c_cls = c_dist = c_fused = 0
    for batch in loader:
        x, y = batch["image"].to(device, non_blocking=True), batch["label"].to(device)
        with autocast(device, amp):
            cls, dst = heads(model, x)
        cls = cls.float()
        n += len(y)
        c_cls += (cls.argmax(1) == y).sum().item()
        if dst is not None:
            dst = dst.float()
            c_dist += (dst.argmax(1) == y).sum().item()
            fused = (cls.softmax(1) + dst.softmax(1)) / 2  # DeiT's fused prediction
            c_fused += (fused.argmax(1) == y).sum().item()
        else:
            c_dist += (cls.argmax(1) == y).sum().item()
            c_fused += (cls.argmax(1) == y).sum().item()
    n, c_cls, c_dist, c_fused = all_sum([n, c_cls, c_dist, c_fused], device)
    return {
        "val_top1_cls": 100 * c_cls / n,
        "val_top1_dist": 100 * c_dist / n,
        "val_top1_fused": 100 * c_fused / n,
        "val_images": int(n),
    }


class MixupWithLambda:
    """timm's Mixup/CutMix (batch mode), also returning lambda so cached teacher targets can be mixed
    exactly like the images: lam * t + (1 - lam) * t.flip(0)."""

    def __init__(self, cfg: TrainConfig, num_classes: int):
        from timm.data import Mixup

        self.m = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob,
            mode="batch",
            label_smoothing=cfg.smoothing,
            num_classes=num_classes,
        )

    def __call__(self, x, y):
        from timm.data.mixup import mixup_target

        if len(x) % 2:  # timm mixes a batch with its reverse; keep even sizes
            x, y = x[:-1], y[:-1]
        lam = self.m._mix_batch(x)  # in place, same draw as timm's Mixup.__call__
        return x, mixup_target(y, self.m.num_classes, lam, self.m.label_smoothing), float(lam)


# --------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, num_classes: int, input_size: int):
    import timm

    kwargs = dict(cfg.model_kwargs)
    if ("deit" in cfg.model or "vit" in cfg.model) and "img_size" not in kwargs:
        kwargs["img_size"] = input_size
    model = timm.create_model(cfg.model, num_classes=num_classes, drop_path_rate=cfg.drop_path, **kwargs)
    return model, kwargs


def train(cfg: TrainConfig) -> dict:
    rank, world, device = setup_distributed()
    main_rank = rank == 0
    out = Path(cfg.out)
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
    dtype = cfg.distillation_type
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")

    manifest = Manifest.load(cfg.shards)
    policy = manifest.policy(**cfg.policy)
    num_classes = len(manifest.classes)
    seed_epoch(cfg.seed, 0, 0)  # same initial weights on every rank (DDP also broadcasts them)
    model, model_kwargs = build_model(cfg, num_classes, policy.input_size)
    distilled = dtype != "none"
    if distilled:
        if not is_distilled(model):
            raise ValueError(f"{cfg.model} has no distillation token: use a timm deit_*_distilled_* model")
        model.set_distilled_training(True)
    model.to(device)

    # data: every rank the same number of batches
    train_stream = ShardStream(
        cfg.shards,
        "train",
        policy,
        cfg.batch_size,
        mode="train",
        rank=rank,
        world_size=world,
        repeats=cfg.repeated_aug,
        seed=cfg.seed,
    )
    dataset = train_stream
    namespace = None
    teacher = None
    if cfg.labels in ("store", "service"):
        source = (
            StoreSource(cfg.store, cfg.namespace)
            if cfg.labels == "store"
            else ServiceSource(cfg.service_url, cfg.service_token)
        )
        meta = source.meta()
        check_compatible(meta, policy, num_classes, cfg.store or cfg.service_url)
        if dtype == "soft" and "p" not in meta["format"]:
            raise ValueError(
                f"soft distillation from cached labels needs a topKp record format, store has {meta['format']}"
            )
        namespace = meta["id"]
        fallback = ServiceSource(cfg.service_url, cfg.service_token) if cfg.service_url else None
        dataset = LabeledStream(train_stream, source, cfg.on_missing, fallback)
    if cfg.needs_teacher:
        teacher_cfg = cfg.teacher
        if teacher_cfg.random_init and teacher_cfg.num_classes is None:
            teacher_cfg = teacher_cfg.model_copy(update={"num_classes": num_classes})
        teacher = Teacher(teacher_cfg, device=str(device))
    loader = make_loader(dataset, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    val_loader = None
    if cfg.eval_every and "val" in manifest.splits:
        val_loader = make_loader(
            ShardStream(cfg.shards, "val", policy, cfg.batch_size, mode="eval", rank=rank, world_size=world),
            num_workers=min(cfg.workers, 1),
        )
    steps_per_epoch = len(train_stream)

    # optimization: DeiT recipe
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    global_batch = cfg.batch_size * world
    lr = cfg.lr * global_batch / 512
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=total_steps,
        lr_min=cfg.min_lr * global_batch / 512,
        warmup_t=cfg.warmup_epochs * steps_per_epoch,
        warmup_lr_init=cfg.warmup_lr,
        t_in_epochs=False,
    )
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    mixup = MixupWithLambda(cfg, num_classes) if (cfg.mixup > 0 or cfg.cutmix > 0) else None
    base = (
        SoftTargetCrossEntropy()
        if mixup
        else (LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing else torch.nn.CrossEntropyLoss())
    )
    criterion = DistillationLoss(base, dtype, cfg.distillation_alpha, cfg.distillation_tau)

    start_epoch, step = 0, 0
    resume = out / "last.pt" if cfg.resume == "auto" else (Path(cfg.resume) if cfg.resume else None)
    if resume is not None and resume.exists():
        ckpt = load_training_checkpoint(resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
        if main_rank:
            log.info("resumed from %s: epoch %d, step %d", resume, start_epoch, step)
    elif cfg.resume not in (None, "auto"):
        raise FileNotFoundError(f"--resume {cfg.resume}: no such checkpoint")

    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    metrics_path = out / "metrics.jsonl"
    summary: dict = {
        "model": cfg.model,
        "labels": cfg.labels,
        "distillation_type": dtype,
        "world_size": world,
        "global_batch": global_batch,
        "namespace": namespace,
        "policy_id": policy.policy_id,
        "seeds_needed": f"0:{seeds_for_run(cfg.epochs, cfg.repeated_aug).stop}",
    }
    totals = {
        "labels_cached": 0,
        "labels_missing": 0,
        "labels_from_service": 0,
        "labels_online": 0,
        "skipped_samples": 0,
    }
    train_images = train_seconds = 0.0
    run_images, steady_start = 0, None  # steady-state throughput: from the end of the first step
    done = False
    last_eval: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        seed_epoch(cfg.seed, epoch, rank)
        dataset.set_epoch(epoch)
        ddp.train()
        t0 = time.perf_counter()
        images, loss_sum, n_steps = 0, 0.0, 0
        bar = tqdm(
            loader,
            total=steps_per_epoch,
            desc=f"epoch {epoch}",
            disable=not (main_rank and cfg.progress),
            unit="batch",
            leave=False,
        )
        for batch in bar:
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            totals["skipped_samples"] += batch["skipped"]
            cached = None
            if "t_classes" in batch:
                for k, v in batch["label_stats"].items():
                    totals[k] += v
                cached = (
                    batch["t_classes"].to(device),
                    None if batch["t_probs"] is None else batch["t_probs"].to(device),
                    batch["t_present"].to(device),
                )
            lam = 1.0
            if mixup is not None:
                x, y, lam = mixup(x, y)
                if cached is not None:
                    cached = tuple(None if t is None else t[: len(x)] for t in cached)
            targets = None
            if cfg.labels == "online":
                targets = TeacherTargets(logits=teacher.logits(x))
            elif cached is not None:
                classes, probs, present = cached
                tdist = target_distribution(classes, probs, num_classes)
                weight = present.float()
                if cfg.on_missing == "online" and not present.all():
                    miss = (~present).nonzero().flatten()
                    logits = teacher.logits(x[miss])  # the teacher sees the mixed image
                    tdist[miss] = (
                        F.softmax(logits, 1) if dtype == "soft" else F.one_hot(logits.argmax(1), num_classes).float()
                    )
                    totals["labels_online"] += len(miss)
                    weight = torch.ones_like(weight)
                if mixup is not None:  # same lambda and pairing as the images
                    tdist = lam * tdist + (1 - lam) * tdist.flip(0)
                    weight = weight * weight.flip(0)
                targets = TeacherTargets(dist=tdist, weight=None if bool(weight.all()) else weight)
            with autocast(device, amp):
                outputs = ddp(x)
            loss = criterion(
                tuple(o.float() for o in outputs) if isinstance(outputs, tuple) else outputs.float(), y, targets
            )
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} step {step}")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
            step += 1
            scheduler.step_update(step)
            images += len(x)
            run_images += len(x)
            if steady_start is None:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                steady_start = (time.perf_counter(), run_images)
            loss_sum += loss.item()
            n_steps += 1
            if main_rank and cfg.progress:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if cfg.max_steps and step >= cfg.max_steps:
                done = True
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        g_images, g_loss, g_steps = all_sum([images, loss_sum, n_steps], device)
        train_images += g_images
        train_seconds += dt
        record = {
            "epoch": epoch,
            "step": step,
            "train_loss": g_loss / max(g_steps, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": g_images / dt,
            "epoch_seconds": dt,
        }
        if val_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs or done):
            last_eval = evaluate(ddp, val_loader, device, amp)
            record.update(last_eval)
        if main_rank:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if cfg.progress:
                tqdm.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}))
            if cfg.checkpoint_every and ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs):
                atomic_save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler else None,
                        "epoch": epoch,
                        "step": step,
                        "config": cfg.model_dump(),
                        "model_meta": {
                            "model": cfg.model,
                            "model_kwargs": model_kwargs,
                            "num_classes": num_classes,
                            "classes": manifest.classes,
                        },
                    },
                    out / "last.pt",
                )
        if dist.is_initialized():
            dist.barrier()
        if done:
            break

    if device.type == "cuda":
        torch.cuda.synchronize()
    steady = None
    if steady_start is not None:
        (n_steady,) = all_sum([run_images - steady_start[1]], device)
        steady = n_steady / (time.perf_counter() - steady_start[0]) if n_steady else None
    totals_g = dict(zip(totals, all_sum(list(totals.values()), device)))
    if main_rank and cfg.export:
        save_weights(
            model.state_dict(),
            out / "model.safetensors",
            {"model": cfg.model, "model_kwargs": model_kwargs, "num_classes": num_classes, "classes": manifest.classes},
        )
    summary.update(
        {
            "epochs_done": (epoch + 1) if cfg.epochs > start_epoch else start_epoch,
            "steps": step,
            "images_per_s": round(train_images / train_seconds, 2) if train_seconds else None,
            "steady_images_per_s": round(steady, 2) if steady else None,
            **{k: int(v) for k, v in totals_g.items()},
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in last_eval.items()},
            "out": str(out),
        }
    )
    if dist.is_initialized():
        # DDP's reducer holds Gloo/NCCL work: release it and let every rank arrive before the
        # group goes, or a rank can abort at interpreter exit ("terminate called without an
        # active exception").
        del ddp, loader, val_loader
        import gc

        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return summary if main_rank else {}
