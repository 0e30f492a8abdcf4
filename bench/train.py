"""Student training throughput by label source; prints one JSON line.

python bench/train.py --steps 40 --batch-size 128 --workers 12      # GPU: DeiT-Ti + RegNetY-16GF at 224 px
python bench/train.py --steps 6 --batch-size 16 --workers 1         # CPU smoke run (slow: 16 GFLOPs teacher)

Modes, all with the real DeiT-Ti student (deit_tiny_distilled_patch16_224) at 224 px and DeiT's
augmentation + mixup/cutmix: `none` (no distillation), `store_file` / `store_redis` (hard labels
precomputed in the embedded file store / Redis), `service` (labels from the REST teacher service,
cache hits), `online` (RegNetY-16GF, random weights, run on every batch: DeiT's recipe). The
teacher's labels are random here: speed does not depend on their values. Throughput is steady
state (after the first batch of each run).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from distill_core import parse_script_args, usable_cpus
from student_trainer import TrainConfig
from student_trainer.train import train
from teacher_service import RecordFormat, Teacher, TeacherSettings, open_store
from teacher_service.local import LocalService, serve_argv

from common import bench_shards


class BenchTrain(BaseModel):
    student: str = Field("deit_tiny_distilled_patch16_224", description="timm student model")
    teacher: str = Field("regnety_160", description="timm teacher model (random weights)")
    input_size: int = Field(224, ge=8, description="crop size")
    batch_size: int = Field(128, ge=2, description="batch size")
    steps: int = Field(30, ge=1, description="training steps per mode")
    workers: int = Field(max(1, min(12, usable_cpus() - 2)), ge=0, description="data-loader workers")
    redis_url: str = Field("redis://127.0.0.1:6379/14", description="Redis for the store_redis mode")
    modes: str = Field("none,store_file,store_redis,service,online", description="comma-separated modes to run")
    model_steps: int = Field(20, ge=0, description="steps of the model-bound measurement (0: skip)")
    compile: bool = Field(False, description="torch.compile: end-to-end runs compiled, model-bound measured both ways")
    renderer: Literal["pil", "torch"] = Field("pil", description="augmentation renderer")
    data: Literal["digits", "jpeg"] = Field("digits", description="demo digits, or ImageNet-shaped JPEGs")
    images: int = Field(2048, ge=64, description="JPEGs to make for --data jpeg")
    shards: str | None = Field(None, description="use these shards instead of making --data (bench/gpu.py's)")
    warmup: bool = Field(True, description="a short untimed run first (CUDA context, autotuning, page cache)")


def step(net, opt, teacher, x, y, amp: str) -> None:
    """One distillation step; the target is the online teacher's argmax, or cached (labels that came
    with the batch)."""
    from distill_core import autocast

    t = teacher.logits(x).argmax(1) if teacher is not None else y
    with autocast(x.device, amp):
        a, b = net(x)
    loss = F.cross_entropy(a.float(), y) + F.cross_entropy(b.float(), t)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def model_bound(args) -> dict:
    """Step throughput with the input already on the device: what the ratios are once data loading
    keeps up (the end-to-end figures are capped by CPU augmentation on small machines). The step is
    the trainer's: AdamW (fused on CUDA), bf16 autocast on CUDA, channels-last teacher, and with
    --compile also torch.compile'd student and teacher (measured beside the eager ones)."""
    import time

    import timm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = "bf16" if device.type == "cuda" else "none"
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    out = {}
    for compiled in (False, True) if args.compile else (False,):
        torch.manual_seed(0)
        student = timm.create_model(args.student, num_classes=1000, img_size=args.input_size).to(device)
        student.set_distilled_training(True)
        fused = {"fused": True} if device.type == "cuda" else {}
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4, **fused)
        teacher = Teacher(TeacherSettings(model=args.teacher, random_init=True, num_classes=1000), device=str(device))
        net = torch.compile(student) if compiled else student
        if compiled:
            teacher.compile()
        rates = {}
        for mode in ("cached", "online"):
            for _ in range(5 if compiled else 3):  # compiled: the first steps compile
                step(net, opt, teacher if mode == "online" else None, x, y, amp)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.model_steps):
                step(net, opt, teacher if mode == "online" else None, x, y, amp)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[mode] = args.batch_size * args.model_steps / (time.perf_counter() - t0)
        tag = "model_bound_compiled" if compiled else "model_bound"
        out.update(
            {
                f"{tag}_cached_images_per_s": round(rates["cached"], 1),
                f"{tag}_online_images_per_s": round(rates["online"], 1),
                f"{tag}_cached_vs_online": round(rates["cached"] / rates["online"], 3),
            }
        )
        del student, teacher, net, opt
    return out


def main():
    args = parse_script_args(BenchTrain, __doc__)
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        m, samples = bench_shards(args.data, d / "shards", args.images, existing=args.shards)
        shards = Path(args.shards) if args.shards else d / "shards"
        policy_over = {"input_size": args.input_size, "renderer": args.renderer}
        policy = m.policy(**policy_over)
        random_teacher = TeacherSettings(model=args.teacher, random_init=True, num_classes=len(m.classes))
        teacher = Teacher(random_teacher, device="cpu")
        ns = teacher.namespace(policy.policy_id, RecordFormat(), m.classes)
        del teacher
        keys = [r.key for r in samples]
        labels = np.random.default_rng(0).integers(0, len(m.classes), len(keys))
        file_url = str(d / "labels.db")
        stores = {"store_file": file_url, "store_redis": args.redis_url}
        for mode, url in stores.items():
            if mode in modes or (mode == "store_file" and "service" in modes):
                with open_store(url, ns) as st:
                    st.put(keys, [0] * len(keys), labels)
        base = dict(
            shards=str(shards),
            model=args.student,
            policy=policy_over,
            batch_size=args.batch_size,
            epochs=1,
            max_steps=args.steps,
            repeated_aug=1,
            workers=args.workers,
            eval_every=0,
            checkpoint_every=0,
            export=False,
            progress=False,
            warmup_epochs=0,
            compile=args.compile,
        )
        service = None
        results, with_startup = {}, {}
        # warm-up run: CUDA context, cuDNN/cuBLAS autotuning and the page cache are paid here,
        # not by whichever mode comes first
        if args.warmup:
            train(TrainConfig(out=str(d / "warmup"), **{**base, "max_steps": 5}, labels="none"))
        try:
            for mode in modes:
                kw = {}
                if mode == "none":
                    kw = dict(labels="none")
                elif mode.startswith("store_"):
                    kw = dict(labels="store", store=stores[mode], namespace=ns.id)
                elif mode == "service":
                    argv = serve_argv(
                        teacher=TeacherSettings(model=args.teacher, random_init=True, num_classes=len(m.classes)),
                        shards=str(shards), store=file_url, policy=policy_over, log_level="warning",
                        augment_workers=1, devices="cpu",
                    )  # fmt: skip
                    service = LocalService(argv, d / "service.log").start(timeout=600)
                    url = service.url
                    kw = dict(labels="service", service_url=url)
                elif mode == "online":
                    kw = dict(labels="online", teacher=TeacherSettings(model=args.teacher, random_init=True))
                s = train(TrainConfig(out=str(d / f"run-{mode}"), **base, **kw))
                results[mode] = s["steady_images_per_s"]
                with_startup[mode] = s["images_per_s"]
                if mode == "store_redis":
                    assert s["labels_cached"] > 0 and s["labels_missing"] == 0
                print(f"{mode}: {results[mode]:.1f} images/s", file=sys.stderr, flush=True)
        finally:
            if service:
                service.stop(30)
            if "store_redis" in modes:
                with open_store(args.redis_url, ns) as st:
                    st.drop()
    cached = (
        min(v for k, v in results.items() if k.startswith("store_"))
        if any(k.startswith("store_") for k in results)
        else None
    )
    out = {
        "student": args.student,
        "teacher": args.teacher,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "workers": args.workers,
        "renderer": args.renderer,
        "data": args.data,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{usable_cpus()}",
        **{f"{k}_images_per_s": round(v, 1) for k, v in results.items()},
        **{f"{k}_with_startup_images_per_s": round(v, 1) for k, v in with_startup.items()},
    }
    if cached and "none" in results:
        out["cached_vs_none"] = round(cached / results["none"], 3)
    if cached and "online" in results:
        out["cached_vs_online"] = round(cached / results["online"], 3)
    if args.model_steps:
        out.update(model_bound(args))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
