"""The models at the device's limit: the bare timm teacher against the project's teacher runtime, and
the student's training step; one JSON line.

python bench/models.py [--teacher regnety_160] [--student deit_tiny_distilled_patch16_224] [--batch-size 128]

- `bare`: `timm.create_model(teacher)` in eval mode, channels-last, bf16 autocast on CUDA, under
  inference_mode: its forward on a batch already on the device, eager and `torch.compile`d; `best`
  is the faster of the two;
- `project`: `teacher_service.Teacher` (the runtime precompute and the service use) on the same
  batch, eager and compiled (`--compile`), through `predict` as the label engine calls it (top-1
  and its probability copied back to the host);
- `project_vs_bare`: the project's best over the bare model's best (the target: >= 0.95);
- `student`: DeiT's distilled student, one training step (forward, both heads' losses, backward,
  fused AdamW) eager and compiled, images/s;
- TFLOP/s achieved: each model's FLOPs per image counted once by torch's FlopCounterMode, times
  its best rate.
Random weights: speed does not depend on them. Compilation time is reported apart (`compile_s`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from pydantic import BaseModel, Field

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_core import autocast, parse_script_args  # noqa: E402
from teacher_service import Teacher, TeacherSettings  # noqa: E402


class BenchModels(BaseModel):
    teacher: str = Field("regnety_160", description="timm teacher")
    student: str = Field("deit_tiny_distilled_patch16_224", description="timm student")
    batch_size: int = Field(128, ge=1, description="batch size")
    input_size: int = Field(224, ge=8, description="image size")
    seconds: float = Field(4.0, gt=0, description="per measurement")
    compile: bool = Field(True, description="also measure torch.compile'd models")
    device: str = Field("cuda" if torch.cuda.is_available() else "cpu", description="device")


def rate(fn, batch: int, seconds: float, device: torch.device, warmup: int = 3) -> tuple[float, float]:
    """(images/s over `seconds`, seconds the warm-up took: compilation, autotuning)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), warm


def flops_per_image(fn, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / batch


def main():
    import timm

    args = parse_script_args(BenchModels, __doc__)
    device = torch.device(args.device)
    amp = "bf16" if device.type == "cuda" else "none"
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out: dict = {"device": name, "batch_size": args.batch_size}

    torch.manual_seed(0)
    bare = timm.create_model(args.teacher, num_classes=1000).eval().to(device, memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)

    def bare_forward(model):
        def run():
            with torch.inference_mode(), autocast(device, amp):
                return model(xc)

        return run

    teacher_flops = flops_per_image(bare_forward(bare), args.batch_size)
    rows = {"bare_eager": rate(bare_forward(bare), args.batch_size, args.seconds, device)}
    if args.compile:
        rows["bare_compiled"] = rate(bare_forward(torch.compile(bare)), args.batch_size, args.seconds, device)
    settings = TeacherSettings(model=args.teacher, random_init=True, num_classes=1000, amp="auto")
    project = Teacher(settings, device=str(device))
    rows["project_eager"] = rate(lambda: project.predict(x), args.batch_size, args.seconds, device)
    if args.compile:
        compiled = Teacher(settings.model_copy(update={"compile": True}), device=str(device))
        rows["project_compiled"] = rate(lambda: compiled.predict(x), args.batch_size, args.seconds, device)
    best_bare = max(v[0] for k, v in rows.items() if k.startswith("bare"))
    best_project = max(v[0] for k, v in rows.items() if k.startswith("project"))
    out["teacher"] = {
        "model": args.teacher,
        **{f"{k}_images_per_s": round(v[0], 1) for k, v in rows.items()},
        "compile_s": {k: round(v[1], 1) for k, v in rows.items()},
        "gflops_per_image": round(teacher_flops / 1e9, 2),
        "best_bare_tflops": round(best_bare * teacher_flops / 1e12, 3),
        "project_vs_bare": round(best_project / best_bare, 3),
    }

    student = timm.create_model(args.student, num_classes=1000, img_size=args.input_size).to(device)
    student.set_distilled_training(True)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    y = torch.randint(0, 1000, (args.batch_size,), device=device)

    def train_step(net):
        def run():
            with autocast(device, amp):
                a, b = net(x)
            loss = torch.nn.functional.cross_entropy(a.float(), y) + torch.nn.functional.cross_entropy(b.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run

    student_flops = flops_per_image(train_step(student), args.batch_size)
    steps = {"eager": rate(train_step(student), args.batch_size, args.seconds, device)}
    if args.compile:
        steps["compiled"] = rate(train_step(torch.compile(student)), args.batch_size, args.seconds, device, warmup=5)
    best = max(v[0] for v in steps.values())
    out["student"] = {
        "model": args.student,
        **{f"step_{k}_images_per_s": round(v[0], 1) for k, v in steps.items()},
        "compile_s": {k: round(v[1], 1) for k, v in steps.items()},
        "gflops_per_image_step": round(student_flops / 1e9, 2),
        "best_tflops": round(best * student_flops / 1e12, 3),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
