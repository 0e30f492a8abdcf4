"""Everything a GPU node is measured on, in one run (under 8 minutes on one GPU); one JSON line.

python bench/gpu.py [--workers 4] [--images 2048]

On ImageNet-shaped JPEGs (made from scikit-learn's photographs, `bench/common.py`), RegNetY-16GF
teacher and DeiT-Ti student at 224 px, random weights (speed does not depend on them):

- `teacher_pil`, `teacher_torch` (bench/teacher.py per renderer): raw teacher forward, precompute
  and service labels/s, with at most --workers CPU workers;
- `train_torch` (bench/train.py): student images/s without labels, from cached labels and with the
  online teacher, end to end and model-bound (input already on the device), eager and compiled;
  `train_pil`: the cached run with the pil renderer, for the renderers' end-to-end ratio;
- `render_ops` (bench/render_ops.py, under 30 s): resize alone and each RandAugment op alone,
  CUDA against the CPU on the same inputs, the largest difference per op (the contract: 0);
- `render`: the torch renderer on CUDA against the CPU on the same uint8 crops (the crops after
  RandAugment must be equal, and the floats the teacher sees), the teacher's labels of both
  (agreement), nvJPEG crops rendered twice and alone vs in a batch (bit-identical), and nvJPEG's
  decode against Pillow's (how far apart the two decoders' pixels are: why the decoder is part of
  the policy);
- `targets`: the issue's figures: precompute >= 0.9 of the raw forward, end-to-end cached training
  >= 0.9 of model-bound, cached vs online >= 3.

Each part runs as its own process with its own time limit; a part that fails or times out is
reported in `failures` and the others still run.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from pydantic import BaseModel, Field

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from render_ops import BenchRenderOps  # noqa: E402
from teacher import BenchTeacher  # noqa: E402
from train import BenchTrain  # noqa: E402

from distill_core import parse_script_args, to_argv  # noqa: E402


class BenchGPU(BaseModel):
    workers: int = Field(4, ge=1, description="CPU workers per GPU (augmentation / data loading)")
    images: int = Field(2048, ge=64, description="ImageNet-shaped JPEGs to make")
    teacher: str = Field("regnety_160", description="timm teacher (random weights)")
    student: str = Field("deit_tiny_distilled_patch16_224", description="timm student")
    batch_size: int = Field(128, ge=1, description="teacher and student batch size")
    seconds: float = Field(8.0, gt=0, description="per service throughput measurement")
    crops: int = Field(512, ge=16, description="crops of the CUDA vs CPU renderer check")


def run_part(name: str, cmd: list[str], timeout: float, failures: dict) -> dict | None:
    print(f"+ {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        failures[name] = f"timed out after {timeout:.0f} s"
        return None
    sys.stderr.write(p.stderr[-3000:])
    if p.returncode != 0:
        failures[name] = f"exit {p.returncode}: {p.stderr[-500:]}"
        return None
    result = json.loads(p.stdout.strip().splitlines()[-1])
    result["part_seconds"] = round(time.perf_counter() - t0, 1)
    return result


def render_check(args) -> dict:
    """The torch renderer on CUDA vs the CPU on the same crops, the teacher's labels, and nvJPEG."""
    import numpy as np

    from shards import AugmentPolicy, decode_image, prepare
    from shards.augment import prepare_encoded
    from shards.render import decode_on_device, randaugment, render_batch, render_prepared
    from teacher_service import Teacher, TeacherSettings

    from common import imagenet_like_jpegs

    policy = AugmentPolicy(renderer="torch")
    jpegs = imagenet_like_jpegs(args.crops, seed=1)
    prepared = [prepare(decode_image(j), f"k{i}", 0, policy) for i, j in enumerate(jpegs)]
    crops = torch.stack([c for c, _ in prepared])
    params = [p for _, p in prepared]
    teacher = Teacher(TeacherSettings(model=args.teacher, random_init=True, num_classes=1000), device="cuda")
    agree, crops_equal, floats_equal, repeat_equal = 0, True, True, True
    for b in range(0, len(crops), args.batch_size):
        x, p = crops[b : b + args.batch_size], params[b : b + args.batch_size]
        crops_equal &= bool(torch.equal(randaugment(x.cuda(), p, policy).cpu(), randaugment(x, p, policy)))
        cpu = render_batch(x, p, policy, "cpu")
        gpu = render_batch(x, p, policy, "cuda")
        floats_equal &= bool(torch.equal(gpu.cpu(), cpu))
        repeat_equal &= bool(torch.equal(gpu, render_batch(x, p, policy, "cuda")))
        agree += int((teacher.logits(cpu.cuda()).argmax(1) == teacher.logits(gpu).argmax(1)).sum())
    nvjpeg = AugmentPolicy(renderer="torch", decoder="nvjpeg")
    items = [prepare_encoded(j, f"k{i}", 0, nvjpeg) for i, j in enumerate(jpegs[:64])]
    batch = render_prepared(items, nvjpeg, "cuda")
    nv_repeat = bool(torch.equal(batch, render_prepared(items, nvjpeg, "cuda")))
    nv_alone = all(torch.equal(render_prepared([items[i]], nvjpeg, "cuda")[0], batch[i]) for i in (0, 17, 63))
    decoded = decode_on_device(jpegs[:64], torch.device("cuda"))
    on_cpu = [torch.from_numpy(np.array(decode_image(j))).permute(2, 0, 1) for j in jpegs[:64]]
    decode_levels = max(float((d.cpu().float() - c.float()).abs().amax()) for d, c in zip(decoded, on_cpu))
    return {
        "crops": len(crops),
        "cuda_uint8_crops_equal_cpu": crops_equal,
        "cuda_floats_equal_cpu": floats_equal,
        "cuda_repeat_bit_identical": repeat_equal,
        "teacher_label_agreement": round(agree / len(crops), 4),
        "nvjpeg_repeat_bit_identical": nv_repeat,
        "nvjpeg_alone_equals_batched": nv_alone,
        "nvjpeg_vs_pillow_decode_max_levels": decode_levels,
        "note": "equal inputs give equal labels up to the teacher's own CPU-vs-CUDA arithmetic (bf16 on CUDA)",
    }


def main():
    args = parse_script_args(BenchGPU, __doc__)
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device")
    py = sys.executable
    failures: dict[str, str] = {}
    out: dict = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "workers_per_gpu": args.workers,
        "images": args.images,
    }
    t0 = time.perf_counter()
    # exactness first: its figures are the ones the throughput below rests on
    ops = BenchRenderOps(device="cuda", crops=64, size=224)
    out["render_ops"] = run_part("render_ops", [py, str(HERE / "render_ops.py"), *to_argv(ops)], 60, failures)
    try:
        out["render"] = render_check(args)
    except Exception as e:  # reported, not fatal: the throughput figures stand on their own
        failures["render"] = repr(e)
    common = dict(data="jpeg", images=args.images, input_size=224, batch_size=args.batch_size, workers=args.workers)
    for renderer in ("pil", "torch"):
        bench = BenchTeacher(
            **common, model=args.teacher, renderer=renderer, seconds=args.seconds, seeds=2, precompute_runs=2,
            naive=False, lookups=50, clients=8, items_per_request=64,
        )  # fmt: skip
        out[f"teacher_{renderer}"] = run_part(
            f"teacher_{renderer}", [py, str(HERE / "teacher.py"), *to_argv(bench)], 110, failures
        )
    train = dict(**common, student=args.student, teacher=args.teacher, steps=40)
    bench = BenchTrain(**train, renderer="torch", modes="none,store_file,online", compile=True)
    out["train_torch"] = run_part("train_torch", [py, str(HERE / "train.py"), *to_argv(bench)], 170, failures)
    bench = BenchTrain(**train, renderer="pil", modes="store_file", model_steps=0)
    out["train_pil"] = run_part("train_pil", [py, str(HERE / "train.py"), *to_argv(bench)], 60, failures)
    targets = {}
    for renderer in ("pil", "torch"):
        t = out.get(f"teacher_{renderer}") or {}
        if t:
            targets[f"precompute_vs_raw_{renderer}"] = t.get("precompute_efficiency")
    tr = out.get("train_torch") or {}
    if tr.get("store_file_images_per_s") and tr.get("model_bound_cached_images_per_s"):
        targets["e2e_cached_vs_model_bound"] = round(
            tr["store_file_images_per_s"] / tr["model_bound_cached_images_per_s"], 3
        )
    targets["cached_vs_online_e2e"] = tr.get("cached_vs_online")
    targets["cached_vs_online_model_bound"] = tr.get("model_bound_cached_vs_online")
    targets["render_ops_all_zero"] = (out.get("render_ops") or {}).get("all_zero")
    targets["cuda_renders_the_cpus_crops"] = (out.get("render") or {}).get("cuda_floats_equal_cpu")
    out["targets"] = targets
    out["failures"] = failures
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
