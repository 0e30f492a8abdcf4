"""Where our student and the official DeiT code's part: the trainer's own step (`train_step`, which
tests/test_deit_reference.py holds equal to the official step) fed by either code's data path and
started from either code's initialisation, one part swapped at a time. One JSON line per run, and
a last line with each arm's top-1 and the paired differences between arms.

    python bench/deit_swaps.py --shards runs/demo/shards --teacher runs/demo/teacher/model.safetensors \
        --arms ours,deit_data,deit_init --seeds 5 --mode plain

Arms (`--arms`, comma-separated):
- `ours`: our data path as `train` runs it: the shards through `labeled_loader` (each crop a
  function of (image, epoch); a shuffle buffer over shards; every image once an epoch), our init;
- `deit_data`: DeiT's data path: torchvision's ImageFolder of the same image bytes, the same
  timm transform drawing from the process's random generators, `RandomSampler` and
  `drop_last=True`, the generators seeded once from the run's seed (DeiT's main.py);
- `deit_init`: our data path, DeiT's initialisation: timm 0.4.12 draws the class token from a
  truncated normal of std 0.02, timm 1.0 from a normal of std 1e-6 (every other weight's
  distribution is the same in both);
- `deit_both`: DeiT's data path and initialisation;
- `deit_replay`: the official run itself, replayed: the initial weights and every batch (in order)
  that `bench/deit_official_record.py` recorded from the official main.py of that seed
  (`--recordings DIR`: DIR/s<seed>/), through our step;
- `deit_batches`: the official run's batches, our initial weights;
- `deit_weights`: the official run's initial weights, our data path.
Every path trains one process at `--batch-size`, with the lr schedule, loss and optimizer of
`train`; `--mode hard` labels each crop with the teacher online (the same labels as cached ones).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field

from distill_core import parse_script_args

# arm: (data path, initialisation)
ARMS = {
    "ours": ("ours", "ours"),
    "deit_data": ("deit", "ours"),
    "deit_init": ("ours", "deit_cls"),
    "deit_both": ("deit", "deit_cls"),
    "deit_replay": ("recorded", "recorded"),
    "deit_batches": ("recorded", "ours"),
    "deit_weights": ("ours", "recorded"),
}


class DeitSwaps(BaseModel):
    shards: str = Field(description="shard directory with train and val splits")
    teacher: str | None = Field(None, description="teacher checkpoint (.safetensors), for --mode hard")
    arms: str = Field("ours,deit_data,deit_init", description=f"comma-separated arms, of: {', '.join(ARMS)}")
    recordings: str | None = Field(
        None, description="the official runs' recordings (bench/deit_official_record.py): DIR/s<seed>/"
    )
    mode: str = Field("plain", description="plain (ViT without distillation token) | hard (distilled, teacher online)")
    seeds: int = Field(5, ge=1, description="seeds per arm, 0..N-1 (paired across arms)")
    first_seed: int = Field(0, ge=0, description="the first seed")
    epochs: int = Field(40, ge=1, description="epochs")
    batch_size: int = Field(64, ge=1, description="batch size")
    lr: float = Field(1.6e-2, gt=0, description="lr per 512 images, scaled linearly")
    min_lr: float = Field(1.25e-6, ge=0, description="final lr")
    warmup_epochs: int = Field(2, ge=0, description="warm-up epochs")
    student_kwargs: dict = Field(
        {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2}, description="JSON timm kwargs of the student"
    )
    out: str | None = Field(None, description="append each run's JSON line to this file too")


def train_config(cfg: DeitSwaps, seed: int):
    from student_trainer.config import TrainConfig

    hard = cfg.mode == "hard"
    return TrainConfig(
        shards=cfg.shards, out="unused", seed=seed, epochs=cfg.epochs, batch_size=cfg.batch_size, repeated_aug=1,
        workers=1, lr=cfg.lr, min_lr=cfg.min_lr, warmup_epochs=cfg.warmup_epochs, drop_path=0.0, mixup=0.0,
        cutmix=0.0, model="deit_tiny_distilled_patch16_224" if hard else "deit_tiny_patch16_224",
        model_kwargs=cfg.student_kwargs, labels="online" if hard else "none",
        teacher={"checkpoint": cfg.teacher} if hard else {},
    )  # fmt: skip


class RecordedBatches:
    """An official run's batches (bench/deit_official_record.py), epoch by epoch, in its order."""

    def __init__(self, recording: Path, epochs: int):
        self.x = np.load(recording / "batches.npy", mmap_mode="r")
        self.y = np.load(recording / "labels.npy")
        if len(self.x) % epochs:
            raise ValueError(f"{recording}: {len(self.x)} batches are not {epochs} epochs of the same length")
        self.steps, self.epoch = len(self.x) // epochs, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for i in range(self.epoch * self.steps, (self.epoch + 1) * self.steps):
            yield torch.from_numpy(np.asarray(self.x[i], dtype=np.float32)), torch.from_numpy(self.y[i]).long()


class DeitLoader(torch.utils.data.DataLoader):
    """A DataLoader with the `set_epoch` the arms' loop calls (DeiT's path has no per-epoch state)."""

    def set_epoch(self, epoch: int) -> None:
        pass


def deit_loader(tcfg, policy, folder: Path, seed: int):
    """DeiT's main.py data path: ImageFolder, the transform on the worker's generators, RandomSampler,
    drop_last; torch and numpy seeded once (Python's random is not seeded there)."""
    from torchvision.datasets import ImageFolder

    from shards.augment import train_transform

    torch.manual_seed(seed)
    np.random.seed(seed)
    dataset = ImageFolder(str(folder), transform=train_transform(policy))
    return DeitLoader(
        dataset, sampler=torch.utils.data.RandomSampler(dataset), batch_size=tcfg.batch_size, num_workers=1,
        drop_last=True,
    )  # fmt: skip


def run_arm(cfg: DeitSwaps, arm: str, seed: int, folder: Path) -> dict:
    from timm.layers import trunc_normal_

    from labels.teacher import Teacher
    from shards import Manifest
    from shards.stream import images_on_device
    from student_trainer.data import eval_loader, labeled_loader
    from student_trainer.targets import TeacherTargetBuilder
    from student_trainer.train import (
        Run,
        build_criterion,
        build_model,
        build_optimization,
        end_epoch_schedule,
        evaluate,
        seed_epoch,
        train_step,
    )  # fmt: skip

    tcfg, cpu = train_config(cfg, seed), torch.device("cpu")
    manifest = Manifest.load(cfg.shards)
    policy = tcfg.augment_policy(manifest)
    data, init = ARMS[arm]
    recording = Path(cfg.recordings or ".") / f"s{seed}"
    seed_epoch(seed, 0, 0)  # as train's setup
    model, _ = build_model(tcfg, len(manifest.classes), policy.input_size)
    if init == "deit_cls":  # timm 0.4.12's VisionTransformer.init_weights: the class token as the position embedding
        with torch.no_grad():
            trunc_normal_(model.cls_token, std=0.02)
    elif init == "recorded":
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(recording / "init.safetensors")), strict=True)
    if data == "deit":
        loader = deit_loader(tcfg, policy, folder, seed)
    elif data == "recorded":
        loader = RecordedBatches(recording, tcfg.epochs)
    else:
        loader = labeled_loader(tcfg, manifest=manifest, policy=policy)
    steps = len(loader)
    optimizer, scheduler = build_optimization(tcfg, model, steps, tcfg.batch_size, cpu)
    teacher = Teacher(tcfg.teacher, device="cpu") if cfg.mode == "hard" else None
    run = Run(
        cfg=tcfg, rank=0, world=1, device=cpu, amp="none", out=None, manifest=manifest, policy=policy, model=model,
        net=model, ema=None, val_loader=None, model_meta={}, checkpoint=None, optimizer=optimizer, scheduler=scheduler,
        scaler=torch.amp.GradScaler("cpu", enabled=False), criterion=build_criterion(tcfg, None),
        targets=TeacherTargetBuilder(tcfg.labels, "error", tcfg.distillation_type, len(manifest.classes), teacher),
    )  # fmt: skip
    step, t0 = 0, time.perf_counter()
    model.train()
    for epoch in range(tcfg.epochs):
        if data == "ours":  # as train does; DeiT's path draws on from its one seeding
            seed_epoch(seed, epoch, 0)
        loader.set_epoch(epoch)
        for batch in loader:
            if isinstance(batch, dict):
                x, y = images_on_device(batch, policy, cpu), batch["label"]
            else:
                x, y = batch
                batch = {}
            step += 1
            train_step(run, x, y, run.targets(batch, x, None), step)
        end_epoch_schedule(run, epoch)
    figures = evaluate(model, eval_loader(tcfg, "val", manifest=manifest, policy=policy), cpu, "none",
                       cfg.mode == "hard")  # fmt: skip
    return {"arm": arm, "mode": cfg.mode, "seed": seed, "epochs": tcfg.epochs, "steps": step,
            "val_top1": round(figures["val_top1"], 3), "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def paired(results: list[dict], arms: list[str]) -> dict:
    """Each arm's top-1 (mean, std over seeds), and each arm minus `ours` paired by seed."""
    by = {a: {r["seed"]: r["val_top1"] for r in results if r["arm"] == a} for a in arms}
    out = {}
    for a in arms:
        v = list(by[a].values())
        out[a] = {"top1": round(statistics.mean(v), 2), "std": round(statistics.stdev(v), 2) if len(v) > 1 else None}
        if a != arms[0]:
            d = [by[a][s] - by[arms[0]][s] for s in by[a] if s in by[arms[0]]]
            if d:
                se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else None
                out[a][f"minus_{arms[0]}"] = {"mean": round(statistics.mean(d), 2), "se": se and round(se, 2),
                                              "per_seed": [round(x, 2) for x in d]}  # fmt: skip
    return out


def main() -> None:
    from common import imagefolder_of_shards

    cfg = parse_script_args(DeitSwaps, __doc__)
    arms = cfg.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; choose from {ARMS}")
    if cfg.mode == "hard" and not cfg.teacher:
        raise SystemExit("--mode hard needs --teacher")
    if any("recorded" in ARMS[a] for a in arms) and not cfg.recordings:
        raise SystemExit("the deit_replay, deit_batches and deit_weights arms need --recordings")
    torch.set_num_threads(1)
    folder = imagefolder_of_shards(cfg.shards, "train", tempfile.mkdtemp(prefix="deit-swaps-"))
    results = []
    for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds):
        for arm in arms:
            r = run_arm(cfg, arm, seed, folder)
            results.append(r)
            print(json.dumps(r), flush=True)
            if cfg.out:
                with open(cfg.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
    print(json.dumps({"mode": cfg.mode, "arms": paired(results, arms)}))


if __name__ == "__main__":
    main()
