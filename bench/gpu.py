"""Everything a GPU node is measured on, in one run of at most 6 minutes; a JSON line per part as it
ends, then the summary line with every target met or not.

python bench/gpu.py [--budget-s 360] [--images 2048]
python bench/gpu.py --device cpu --smoke        # the orchestration on a CPU, tiny sizes (the tests run it)

On ImageNet-shaped JPEGs made once for every part (`common.jpeg_shards`, in parallel), with
RegNetY-16GF as the teacher and DeiT-Ti as the student at 224 px, random weights (speed does not
depend on them), each part its own process with its own time limit, inside the run's budget:

- `render_ops` (bench/render_ops.py): resize alone and each RandAugment op alone, the device
  against the CPU on the same inputs, the largest difference per op (the contract: 0);
- `render`: the whole render on the device against the CPU on the same uint8 crops (the crops
  after RandAugment and the floats the teacher sees must be equal), the teacher's labels of both,
  nvJPEG crops rendered twice and alone vs in a batch, nvJPEG's decode against Pillow's;
- `models` (bench/models.py): the bare timm teacher against the project's teacher runtime (eager
  and compiled), TFLOP/s, and the student's training step;
- `teacher_torch`, `teacher_pil` (bench/teacher.py, 4 workers): raw forward, precompute (with its
  start-up by phase) and the service at saturation;
- `train_torch_w4`, `train_torch_w12`, `train_pil_w12` (bench/train.py): end-to-end student
  images/s from cached labels (and without labels and with the online teacher at 12 workers),
  with the model-bound rate (input already on the device) beside them.

A part that fails, times out or finds no time left in the budget is named in `failures`; the
others still run.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from pydantic import BaseModel, Field

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from models import BenchModels  # noqa: E402
from render_ops import BenchRenderOps  # noqa: E402
from teacher import BenchTeacher  # noqa: E402
from train import BenchTrain  # noqa: E402

from distill_core import parse_script_args, to_argv, usable_cpus  # noqa: E402

TARGETS = {  # name: (what, the least that meets it)
    "e2e_cached_vs_model_bound": ("end-to-end cached training vs model-bound, <= 12 workers", 0.9),
    "torch_vs_pil_e2e": ("the torch renderer end to end vs pil, 12 workers", 1.5),
    "cached_vs_online_e2e": ("cached vs online, end to end", 3.0),
    "precompute_vs_best_raw": ("precompute vs the best raw teacher forward, 4 workers", 0.9),
    "service_vs_best_raw": ("service at saturation vs the best raw teacher forward", 0.8),
    "project_vs_bare_forward": ("the project's raw forward vs the bare timm model's best", 0.95),
    "render_ops_all_zero": ("every render part equal on the device and the CPU", True),
    "device_renders_the_cpus_crops": ("the whole render equal on the device and the CPU", True),
    "wall_s": ("bench/gpu.py wall time, seconds (at most)", 360),
}


class BenchGPU(BaseModel):
    device: str = Field("cuda", description="the GPU (cpu: the orchestration only, with --smoke)")
    budget_s: float = Field(360.0, gt=0, description="the whole run's wall-clock budget")
    images: int = Field(2048, ge=64, description="ImageNet-shaped JPEGs to make")
    teacher: str = Field("regnety_160", description="timm teacher (random weights)")
    student: str = Field("deit_tiny_distilled_patch16_224", description="timm student")
    batch_size: int = Field(128, ge=1, description="teacher and student batch size")
    seconds: float = Field(6.0, gt=0, description="per throughput measurement")
    crops: int = Field(512, ge=16, description="crops of the device vs CPU render check")
    smoke: bool = Field(False, description="tiny sizes: check the orchestration, measure nothing")


class Run:
    """The parts of one run: each a process with a time limit inside the run's budget."""

    def __init__(self, budget_s: float):
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.failures: dict[str, str] = {}
        self.out: dict = {}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def part(self, name: str, cmd: list[str], limit: float) -> dict | None:
        timeout = min(limit, self.left() - 5)
        if timeout < 10:
            self.failures[name] = f"skipped: {self.left():.0f} s left of the budget"
            return None
        print(f"+ {name} (at most {timeout:.0f} s): {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        # its own session, so that a timeout stops what the part started too (a bench's `serve`,
        # its label engine and workers), not only the part's own process
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(p.pid)
            p.communicate()
            self.failures[name] = f"timed out after {timeout:.0f} s"
            return None
        finally:
            _kill_group(p.pid)  # what the part left behind when it exited, too
        sys.stderr.write(stderr[-3000:])
        if p.returncode != 0:
            self.failures[name] = f"exit {p.returncode}: {stderr[-500:]}"
            return None
        result = json.loads(stdout.strip().splitlines()[-1])
        return self.record(name, result, time.perf_counter() - t0)

    def record(self, name: str, result: dict, seconds: float) -> dict:
        result["part_seconds"] = round(seconds, 1)
        self.out[name] = result
        print(json.dumps({"part": name, **result}), flush=True)
        return result


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the group is empty: nothing was left behind
        pass


def render_check(args) -> dict:
    """The torch renderer on the device vs the CPU on the same crops, the teacher's labels, and nvJPEG."""
    import numpy as np

    from shards import AugmentPolicy, cut_crop, decode_image
    from shards.augment import draw_for_device_decode
    from shards.device_decode import decode_on_device
    from shards.plan import BatchPlan
    from shards.render import randaugment, render_batch, render_items
    from teacher_service import Teacher, TeacherSettings

    from common import imagenet_like_jpegs

    device = torch.device(args.device)
    policy = AugmentPolicy(renderer="torch")
    jpegs = imagenet_like_jpegs(args.crops, seed=1, processes=min(8, usable_cpus()))
    prepared = [cut_crop(decode_image(j), f"k{i}", 0, policy) for i, j in enumerate(jpegs)]
    crops = torch.stack([c for c, _ in prepared])
    params = [p for _, p in prepared]
    teacher = Teacher(TeacherSettings(model=args.teacher, random_init=True, num_classes=1000), device=str(device))
    agree, crops_equal, floats_equal, repeat_equal = 0, True, True, True
    for b in range(0, len(crops), args.batch_size):
        x, p = crops[b : b + args.batch_size], params[b : b + args.batch_size]
        plan = BatchPlan.build(p, policy)
        on_device = randaugment(x.to(device), plan.to(device), policy).cpu()
        crops_equal &= bool(torch.equal(on_device, randaugment(x, plan, policy, every_family=False)))
        cpu = render_batch(x, p, policy, "cpu")
        dev = render_batch(x, plan, policy, device)
        floats_equal &= bool(torch.equal(dev.cpu(), cpu))
        repeat_equal &= bool(torch.equal(dev, render_batch(x, plan, policy, device)))
        agree += int((teacher.logits(cpu.to(device)).argmax(1) == teacher.logits(dev).argmax(1)).sum())
    out = {
        "crops": len(crops),
        "device_uint8_crops_equal_cpu": crops_equal,
        "device_floats_equal_cpu": floats_equal,
        "device_repeat_bit_identical": repeat_equal,
        "teacher_label_agreement": round(agree / len(crops), 4),
        "note": "equal inputs give equal labels up to the teacher's own CPU-vs-device arithmetic (bf16 on CUDA)",
    }
    if device.type == "cuda":
        nvjpeg = AugmentPolicy(renderer="torch", decoder="nvjpeg")
        items = [draw_for_device_decode(j, f"k{i}", 0, nvjpeg) for i, j in enumerate(jpegs[:64])]
        batch = render_items(items, nvjpeg, device)
        out["nvjpeg_repeat_bit_identical"] = bool(torch.equal(batch, render_items(items, nvjpeg, device)))
        out["nvjpeg_alone_equals_batched"] = all(
            torch.equal(render_items([items[i]], nvjpeg, device)[0], batch[i]) for i in (0, 17, 63)
        )
        decoded = decode_on_device(jpegs[:64], device)
        on_cpu = [torch.from_numpy(np.array(decode_image(j))).permute(2, 0, 1) for j in jpegs[:64]]
        out["nvjpeg_vs_pillow_decode_max_levels"] = max(
            float((d.cpu().float() - c.float()).abs().amax()) for d, c in zip(decoded, on_cpu)
        )
    return out


def targets(out: dict, wall_s: float) -> dict:
    """Each target's value and whether it is met (None: the parts it needs did not run)."""
    models = (out.get("models") or {}).get("teacher", {})
    best_raw = max([v for k, v in models.items() if k.endswith("_images_per_s")] or [0]) or None
    values: dict = {}
    trains = {w: out.get(f"train_torch_w{w}") or {} for w in (4, 12)}
    ratios = [
        t["store_file_images_per_s"] / t["model_bound_cached_images_per_s"]
        for t in trains.values()
        if t.get("store_file_images_per_s") and t.get("model_bound_cached_images_per_s")
    ]
    values["e2e_cached_vs_model_bound"] = max(ratios) if ratios else None
    pil = (out.get("train_pil_w12") or {}).get("store_file_images_per_s")
    values["torch_vs_pil_e2e"] = trains[12].get("store_file_images_per_s", 0) / pil if pil else None
    values["cached_vs_online_e2e"] = trains[12].get("cached_vs_online")
    teacher = out.get("teacher_torch") or {}
    values["precompute_vs_best_raw"] = teacher["precompute_labels_per_s"] / best_raw if teacher and best_raw else None
    values["service_vs_best_raw"] = teacher["service_labels_per_s"] / best_raw if teacher and best_raw else None
    values["project_vs_bare_forward"] = models.get("project_vs_bare")
    values["render_ops_all_zero"] = (out.get("render_ops") or {}).get("all_zero")
    values["device_renders_the_cpus_crops"] = (out.get("render") or {}).get("device_floats_equal_cpu")
    values["wall_s"] = round(wall_s, 1)
    result = {}
    for name, (what, least) in TARGETS.items():
        v = values.get(name)
        if isinstance(v, float):
            v = round(v, 3)
        if v is None:
            met = None
        elif name == "wall_s":
            met = v <= least
        elif isinstance(least, bool):
            met = v is least
        else:
            met = v >= least
        result[name] = {"what": what, "target": least, "value": v, "met": met}
    return result


def main():
    args = parse_script_args(BenchGPU, __doc__)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device (--device cpu --smoke runs its orchestration on a CPU)")
    if args.smoke:
        args = args.model_copy(update=dict(images=64, teacher="regnety_002", batch_size=16, seconds=0.5, crops=32))
    size = 64 if args.smoke else 224
    py = sys.executable
    run = Run(args.budget_s)
    head = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{usable_cpus()}",
        "cores": usable_cpus(),
        "images": args.images,
        "torch": torch.__version__,
    }
    print(json.dumps({"part": "start", **head}), flush=True)
    with tempfile.TemporaryDirectory() as d:
        from common import jpeg_shards

        t0 = time.perf_counter()
        shards = Path(d) / "shards"
        jpeg_shards(shards, args.images, shard_size=64 if args.smoke else 256, processes=min(16, usable_cpus()))
        run.record("data", {"jpegs": args.images}, time.perf_counter() - t0)
        # exactness first: its figures are the ones the throughput below rests on
        small = args.smoke
        ops = BenchRenderOps(device=args.device, crops=16 if small else 64, size=size, boxes=4 if small else 24)
        run.part("render_ops", [py, str(HERE / "render_ops.py"), *to_argv(ops)], 40)
        t0 = time.perf_counter()
        try:
            run.record("render", render_check(args), time.perf_counter() - t0)
        except Exception as e:  # reported, not fatal: the throughput figures stand on their own
            run.failures["render"] = repr(e)
        models = BenchModels(
            teacher=args.teacher, student=args.student, batch_size=args.batch_size, input_size=size,
            seconds=args.seconds / 2, device=args.device, compile=not args.smoke,
        )  # fmt: skip
        run.part("models", [py, str(HERE / "models.py"), *to_argv(models)], 70)
        common = dict(data="jpeg", shards=str(shards), input_size=size, batch_size=args.batch_size)
        for renderer, limit in (("torch", 80), ("pil", 60)):
            bench = BenchTeacher(
                **common, model=args.teacher, renderer=renderer, workers=4, seconds=args.seconds, seeds=2,
                precompute_runs=1, naive=False, lookups=20, clients=8, items_per_request=64,
            )  # fmt: skip
            run.part(f"teacher_{renderer}", [py, str(HERE / "teacher.py"), *to_argv(bench)], limit)
        steps = 5 if args.smoke else 40
        for name, renderer, workers, modes, limit in (
            ("train_torch_w12", "torch", 12, "none,store_file,online", 60),
            ("train_torch_w4", "torch", 4, "store_file", 35),
            ("train_pil_w12", "pil", 12, "store_file", 35),
        ):
            workers = min(workers, max(1, usable_cpus() - 1))
            bench = BenchTrain(
                **common, student=args.student, teacher=args.teacher, steps=steps, workers=workers,
                renderer=renderer, modes=modes, model_steps=steps if name == "train_torch_w12" else 0,
                warmup=name == "train_torch_w12",
            )  # fmt: skip
            part = run.part(name, [py, str(HERE / "train.py"), *to_argv(bench)], limit)
            if part and name != "train_torch_w12" and "train_torch_w12" in run.out:
                for k in ("model_bound_cached_images_per_s", "model_bound_online_images_per_s"):
                    part[k] = run.out["train_torch_w12"].get(k)
    wall = time.perf_counter() - run.t0
    summary = {**head, "targets": targets(run.out, wall), "failures": run.failures, "seconds": round(wall, 1)}
    print(json.dumps({"part": "summary", **summary}), flush=True)


if __name__ == "__main__":
    main()
