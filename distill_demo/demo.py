"""The end-to-end demo on the embedded default (no Redis, no Docker), each step a process of its own
as the compose jobs run them:

build demo shards -> train a small RegNetY teacher -> precompute its hard labels into the file
store -> per seed, three students of the same size, 2 DDP CPU processes each:

- `plain`: the ViT *without* a distillation token, trained on the true labels (the paper's
  no-distillation baseline);
- `cached`: the same ViT with a distillation token, hard distillation from the precomputed labels;
- `online`: the same, with the teacher run in the training loop (DeiT's recipe).

-> `results.md` (top-1 per mode, and the paired difference distilled - plain per seed, mean ± std),
`results.png` (validation top-1 per epoch, images/s) and a one-line JSON summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from distill_core import Command, to_argv
from labels.teacher import TeacherSettings
from shards.build import BuildConfig
from shards.flags import RendererFlag
from student_trainer.config import TrainConfig
from student_trainer.plot import group_runs, mean_std, plot_runs, read_metrics, throughput
from teacher_service.precompute import PrecomputeConfig

# Patch 4 on 32 px crops: 64 tokens, width 64, depth 4 (209k parameters). A wider, deeper student
# (96 x 6) learned slower in the same minutes and distillation did not help it either (README).
STUDENT_KWARGS = {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2}
MODES = {  # mode: (timm model, --labels)
    "plain": ("deit_tiny_patch16_224", "none"),
    "cached": ("deit_tiny_distilled_patch16_224", "store"),
    "online": ("deit_tiny_distilled_patch16_224", "online"),
}


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: str = Field("runs/demo", description="output directory (shards, teacher, labels, runs, results)")
    seeds: int = Field(1, ge=1, description="student seeds per mode (the README table used 3)")
    modes: list[str] = Field(list(MODES), description=f"student modes to run, of: {', '.join(MODES)}")
    teacher_epochs: int = Field(20, ge=1, description="epochs of the demo teacher")
    student_epochs: int = Field(40, ge=1, description="epochs of each student run")
    student_kwargs: dict = Field(STUDENT_KWARGS, description="JSON timm kwargs of the student ViT")
    student_lr: float = Field(1.6e-2, gt=0, description="student learning rate per global batch 512, scaled linearly")
    batch_size: int = Field(32, ge=1, description="student batch size per rank")
    mixup: float = Field(0.0, ge=0, description="mixup alpha (DeiT: 0.8; off for 1,437 images)")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha (DeiT: 1.0)")
    nproc: int = Field(2, ge=1, description="DDP processes per run (torchrun --nproc_per_node)")
    renderer: RendererFlag = None
    policy: dict = Field(
        default_factory=dict,
        description='JSON augmentation policy overrides for the labels and students, e.g. {"eval_crop_pct": 1.0}',
    )
    student_flags: dict = Field(
        default_factory=dict,
        description='JSON train fields for every student, over the demo\'s: {"sched_on_epochs": true} (ablations)',
    )

    @field_validator("modes")
    @classmethod
    def _known_modes(cls, modes: list[str]) -> list[str]:
        unknown = sorted(set(modes) - set(MODES))
        if unknown:
            raise ValueError(f"unknown modes {unknown}; choose from {list(MODES)}")
        return modes


def _run(cmd: list[str], log: Path) -> dict:
    """Run a step as its own process (like a compose job); its last stdout line is its JSON summary."""
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if p.returncode != 0:
        raise RuntimeError(f"step failed ({p.returncode}): {' '.join(cmd)}\nsee {log}:\n" + log.read_text()[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def train_cmd(launcher: list[str], **fields) -> list[str]:
    return [*launcher, "-m", "student_trainer", "train", *to_argv(TrainConfig(**fields))]


def student_cmd(cfg: DemoConfig, shards: Path, out: Path, mode: str, seed: int, store: str, teacher: str):
    model, labels = MODES[mode]
    extra = {"store": {"store": store}, "online": {"teacher": TeacherSettings(checkpoint=teacher)}}.get(labels, {})
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}"]
    fields = dict(
        shards=str(shards),
        out=str(out),
        model=model,
        model_kwargs=cfg.student_kwargs,
        labels=labels,
        epochs=cfg.student_epochs,
        batch_size=cfg.batch_size,
        repeated_aug=1,
        lr=cfg.student_lr,
        warmup_epochs=2,
        drop_path=0.0,
        mixup=cfg.mixup,
        cutmix=cfg.cutmix,
        workers=1,
        threads=1,
        seed=seed,
        **({"renderer": cfg.renderer} if cfg.renderer else {}),
        eval_every=max(1, cfg.student_epochs // 15),  # curves for results.png, at little cost
        progress=False,
        **extra,
        **({"policy": cfg.policy} if cfg.policy else {}),
    )
    fields.update(cfg.student_flags)  # an ablation may override the demo's own fields
    return train_cmd(launcher, **fields)


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    shards, store = out / "shards", str(out / "labels.db")
    t_start = time.perf_counter()
    if not (shards / "manifest.json").exists():
        build = to_argv(BuildConfig(demo="digits", out=shards, shard_size=128))
        _run([sys.executable, "-m", "shards", "build", *build], logs / "shards.log")
    teacher_dir = out / "teacher"
    if not (teacher_dir / "model.safetensors").exists():
        cmd = train_cmd(
            [sys.executable],
            shards=str(shards),
            out=str(teacher_dir),
            model="regnety_002",
            labels="none",
            epochs=cfg.teacher_epochs,
            batch_size=64,
            repeated_aug=1,
            mixup=0,
            cutmix=0,
            lr=0.12,
            warmup_epochs=1,
            sched_on_epochs=False,  # the demo teacher's recipe, fixed: every figure since 2026-11 used it
            scale_min_lr=True,
            policy={"crop": "resized"},
            drop_path=0,
            workers=1,
            progress=False,
            eval_every=cfg.teacher_epochs,
        )
        (logs / "teacher.json").write_text(json.dumps(_run(cmd, logs / "teacher.log")))
    teacher = json.loads((logs / "teacher.json").read_text())
    checkpoint = str(teacher_dir / "model.safetensors")
    pre = {"labels_computed": 0}
    if "cached" in cfg.modes:  # exactly what the students' schedule asks for (1 repeat: seeds 0..E-1)
        job = PrecomputeConfig(
            shards=str(shards), epochs=cfg.student_epochs, repeated_aug=1, store=store,
            teacher=TeacherSettings(checkpoint=checkpoint), workers=1, renderer=cfg.renderer, progress=False,
            policy=cfg.policy,
            quality_labels=10**9,  # every label the students learn, not a sample
        )  # fmt: skip
        pre = _run([sys.executable, "-m", "teacher_service", "precompute", *to_argv(job)], logs / "precompute.log")
    runs: dict[str, list[Path]] = {mode: [] for mode in cfg.modes}
    summaries: dict[str, list[dict]] = {mode: [] for mode in cfg.modes}
    for seed in range(cfg.seeds):
        for mode in cfg.modes:
            run_dir = out / f"student-{mode}-s{seed}"
            if run_dir.exists():  # a rerun of the demo starts its students afresh
                for f in ("metrics.jsonl", "last.pt"):
                    (run_dir / f).unlink(missing_ok=True)
            cmd = student_cmd(cfg, shards, run_dir, mode, seed, store, checkpoint)
            summaries[mode].append(_run(cmd, logs / f"student-{mode}-s{seed}.log"))
            runs[mode].append(run_dir)
    rows = summarize(runs, summaries)
    table = render_table(rows, teacher, cfg, pre.get("label_quality"))
    (out / "results.md").write_text(table)
    title = f"demo: {cfg.student_epochs} epochs, student {json.dumps(cfg.student_kwargs)}"
    if cfg.mixup or cfg.cutmix:
        title += f", mixup {cfg.mixup} / cutmix {cfg.cutmix}"
    plot_runs(group_runs([r for mode in cfg.modes for r in runs[mode]]), out / "results.png", title)
    print(table, file=sys.stderr)
    return {
        "out": str(out),
        "teacher_val_top1": round(teacher["val_top1"], 2),
        "labels_precomputed": pre["labels_computed"],
        "label_quality": pre.get("label_quality"),
        "results": rows,
        "results_md": str(out / "results.md"),
        "results_png": str(out / "results.png"),
        "minutes": round((time.perf_counter() - t_start) / 60, 2),
    }


def _stats(values: list[float]) -> dict:
    mean, std = mean_std(values)
    return {"mean": round(mean, 2), "std": round(std, 2) if len(values) > 1 else None}


def summarize(runs: dict[str, list[Path]], summaries: dict[str, list[dict]]) -> list[dict]:
    """Per mode: top-1 (the model's prediction), both heads, images/s, and the per-seed paired
    difference to `plain` (the same seed's data order and initialization draw)."""
    rows = []
    plain = [s["val_top1"] for s in summaries.get("plain", [])]
    for mode, results in summaries.items():
        top1 = [s["val_top1"] for s in results]
        row = {
            "mode": mode,
            "model": results[0]["model"],
            "labels": results[0]["labels"],
            "seeds": len(results),
            "top1": _stats(top1),
            "top1_cls": _stats([s["val_top1_cls"] for s in results]),
            "top1_dist": _stats([s["val_top1_dist"] for s in results]) if mode != "plain" else None,
            "top1_fused_probs": _stats([s["val_top1_fused_probs"] for s in results]) if mode != "plain" else None,
            "images_per_s": _stats([throughput(read_metrics(r)) or 0.0 for r in runs[mode]]),
        }
        if plain and mode != "plain":
            row["minus_plain"] = _stats([a - b for a, b in zip(top1, plain)])
            row["minus_plain_per_seed"] = [round(a - b, 2) for a, b in zip(top1, plain)]
        rows.append(row)
    return rows


def label_quality_lines(quality: dict | None, teacher: dict) -> list[str]:
    """What the distillation head learns, in a sentence: how often the teacher's hard label on the
    students' training crops is the image's class (overall, by crop scale), beside its clean top-1."""
    if not quality or not quality.get("labels"):
        return []
    scales = ", ".join(f"{k}: {v['agree_pct']:.2f}%" for k, v in quality["by_crop_scale"].items())
    return [
        f"Label quality: on the students' training crops the teacher's hard label is the image's class for "
        f"{quality['agree_pct']:.2f}% of its {quality['labels']:,} labels (by the share of the image a crop "
        f"covers: {scales}), against {teacher['val_top1']:.2f}% top-1 on the clean val images. The distillation "
        "head learns these labels; the class head learns the classes.",
        "",
    ]


def render_table(rows: list[dict], teacher: dict, cfg: DemoConfig, quality: dict | None = None) -> str:
    def cell(s: dict | None, sign: bool = False) -> str:
        if s is None:
            return "-"
        mean = f"{s['mean']:+.2f}" if sign else f"{s['mean']:.2f}"
        return mean + (f" ± {s['std']:.2f}" if s["std"] is not None else "")

    lines = [
        f"Teacher regnety_002: val top-1 {teacher['val_top1']:.2f}. Students: {cfg.student_epochs} epochs, "
        f"{json.dumps(cfg.student_kwargs)}, mixup {cfg.mixup}, cutmix {cfg.cutmix}, {cfg.nproc} DDP CPU processes.",
        "",
        *label_quality_lines(quality, teacher),
        "| mode | student | labels | seeds | top-1 | minus plain, paired (per seed) | class head | dist head "
        "| images/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        paired = "-"
        if "minus_plain" in r:
            paired = (
                f"{cell(r['minus_plain'], sign=True)} ({', '.join(f'{d:+.2f}' for d in r['minus_plain_per_seed'])})"
            )
        lines.append(
            f"| {r['mode']} | {r['model']} | {r['labels']} | {r['seeds']} | {cell(r['top1'])} | {paired} | "
            f"{cell(r['top1_cls'])} | {cell(r['top1_dist'])} | {cell(r['images_per_s'])} |"
        )
    lines += [
        "",
        "top-1: the model's prediction on the validation split (fused heads for the distilled students, the "
        "class head for plain); mean ± std over seeds. minus plain: the same seed's distilled top-1 minus plain "
        "top-1. images/s: training throughput after each epoch's first step.",
    ]
    return "\n".join(lines) + "\n"


COMMAND = Command(
    "demo",
    help="end-to-end demo on the digits data set (embedded file store, 2 CPU ranks)",
    description=__doc__.split("\n\n")[0],
    config=DemoConfig,
    run=run_demo,
)
