"""The end-to-end demo on the embedded default (no Redis, no Docker), as the compose jobs would run it:

build demo shards -> train a small RegNetY teacher -> precompute its labels into the file store ->
train the DeiT-style student with 2 DDP CPU processes from cached labels, without distillation and
with the online teacher -> a table of top-1 (class, distillation, fused heads) and images/s.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from distill_core import Command

STUDENT_KWARGS = {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2}


def _run(cmd: list[str], log: Path) -> dict:
    """Run a step as its own process (like a compose job); its last stdout line is its JSON summary."""
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if p.returncode != 0:
        raise RuntimeError(f"step failed ({p.returncode}): {' '.join(cmd)}\nsee {log}:\n" + log.read_text()[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def student_cmd(args, out: Path, shards: Path, labels: str, seed: int, extra: list[str]) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    return [
        *launcher,
        "-m",
        "student_trainer",
        "train",
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--model",
        "deit_tiny_distilled_patch16_224",
        "--model-kwargs",
        json.dumps(STUDENT_KWARGS),
        "--labels",
        labels,
        "--epochs",
        str(args.student_epochs),
        "--batch-size",
        str(args.batch_size),
        "--repeated-aug",
        "1",
        "--lr",
        str(args.student_lr),
        "--warmup-epochs",
        "2",
        "--drop-path",
        "0.0",
        "--mixup",
        str(args.mixup),
        "--cutmix",
        str(args.cutmix),
        "--workers",
        "1",
        "--threads",
        "1",
        "--seed",
        str(seed),
        "--eval-every",
        str(args.student_epochs),
        "--no-progress",
        *extra,
    ]


def run_demo(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    shards = out / "shards"
    store = str(out / "labels.db")
    t_start = time.perf_counter()
    py = [sys.executable, "-m"]
    if not (shards / "manifest.json").exists():
        _run(
            [*py, "shards", "build", "--demo", "digits", "--out", str(shards), "--shard-size", "128"],
            logs / "shards.log",
        )
    teacher_dir = out / "teacher"
    if not (teacher_dir / "model.safetensors").exists():
        teacher = _run(
            [
                *py,
                "student_trainer",
                "train",
                "--shards",
                str(shards),
                "--out",
                str(teacher_dir),
                "--model",
                "regnety_002",
                "--labels",
                "none",
                "--epochs",
                str(args.teacher_epochs),
                "--batch-size",
                "64",
                "--repeated-aug",
                "1",
                "--mixup",
                "0",
                "--cutmix",
                "0",
                "--lr",
                "0.12",
                "--warmup-epochs",
                "1",
                "--drop-path",
                "0",
                "--workers",
                "1",
                "--no-progress",
                "--eval-every",
                str(args.teacher_epochs),
            ],
            logs / "teacher.log",
        )
    else:
        teacher = json.loads((logs / "teacher.json").read_text())
    (logs / "teacher.json").write_text(json.dumps(teacher))
    checkpoint = str(teacher_dir / "model.safetensors")
    pre = _run(
        [
            *py,
            "teacher_service",
            "precompute",
            "--shards",
            str(shards),
            "--seeds",
            f"0:{args.student_epochs}",
            "--store",
            store,
            "--checkpoint",
            checkpoint,
            "--workers",
            "1",
            "--no-progress",
        ],
        logs / "precompute.log",
    )
    runs: dict[str, list[dict]] = {"none": [], "store": [], "online": []}
    for seed in range(args.seeds):
        for mode in runs:
            extra = {"none": [], "store": ["--store", store], "online": ["--teacher-checkpoint", checkpoint]}[mode]
            runs[mode].append(
                _run(
                    student_cmd(args, out / f"student-{mode}-s{seed}", shards, mode, seed, extra),
                    logs / f"student-{mode}-s{seed}.log",
                )
            )
    rows = []
    for mode, results in runs.items():
        row = {"labels": mode, "seeds": len(results)}
        for k in ("val_top1_cls", "val_top1_dist", "val_top1_fused", "images_per_s"):
            vals = [r[k] for r in results]
            row[k] = round(statistics.mean(vals), 2)
            if len(vals) > 1:
                row[k + "_std"] = round(statistics.stdev(vals), 2)
        rows.append(row)
    table = render_table(rows, teacher)
    (out / "results.md").write_text(table)
    print(table, file=sys.stderr)
    return {
        "out": str(out),
        "teacher_val_top1": round(teacher["val_top1_cls"], 2),
        "labels_precomputed": pre["labels_computed"],
        "results": rows,
        "minutes": round((time.perf_counter() - t_start) / 60, 2),
    }


def render_table(rows: list[dict], teacher: dict) -> str:
    def cell(r, k):
        return f"{r[k]:.2f}" + (f" ± {r[k + '_std']:.2f}" if k + "_std" in r else "")

    lines = [
        f"Teacher regnety_002: val top-1 {teacher['val_top1_cls']:.2f}",
        "",
        "| student labels | seeds | top-1 class head | top-1 dist head | top-1 fused | images/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['labels']} | {r['seeds']} | {cell(r, 'val_top1_cls')} | {cell(r, 'val_top1_dist')} | "
            f"{cell(r, 'val_top1_fused')} | {cell(r, 'images_per_s')} |"
        )
    return "\n".join(lines) + "\n"


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: str = Field("runs/demo", description="output directory (shards, teacher, labels, runs, results)")
    seeds: int = Field(1, ge=1, description="student seeds per mode (the README table used 3)")
    teacher_epochs: int = Field(20, ge=1, description="epochs of the demo teacher")
    student_epochs: int = Field(40, ge=1, description="epochs of each student run")
    student_lr: float = Field(1.6e-2, gt=0, description="student learning rate per global batch 512, scaled linearly")
    batch_size: int = Field(32, ge=1, description="student batch size per rank")
    mixup: float = Field(0.0, ge=0, description="mixup alpha (DeiT: 0.8; off for 1,437 images)")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha (DeiT: 1.0)")
    nproc: int = Field(2, ge=1, description="DDP processes per run (torchrun --nproc_per_node)")


COMMAND = Command(
    "demo",
    help="end-to-end demo on the digits data set (embedded file store, 2 CPU ranks)",
    config=DemoConfig,
    run=run_demo,
)
