"""Distillation's effect in the official DeiT code and in ours, on the same shards, teacher file,
student and recipe, over seeds. One JSON line per run (also appended to OUT/runs.jsonl, so a
second call adds the runs that are missing), then one line of figures. A row is counted for the
recipe it ran (epochs, batch, lr, policy, and the teacher file's SHA-256); an OUT holds one
teacher file's runs, and a call with another is refused.

    python bench/deit_compare.py --shards SHARDS --teacher TEACHER.safetensors --out OUT \
        --official-code DEIT_CHECKOUT --official-libs OLD_LIBS --seeds 4 --epochs 20

The official code is DeiT 7e160fe's `main.py` on timm 0.4.12 and Pillow 9.5 (`--official-libs`, a
folder holding both), patched to run on the CPU and to take the crop scale and flip as flags, over
an ImageFolder of the shards' own image bytes; its distilled student is DeiT's
`DistilledVisionTransformer`, its plain student timm 0.4.12's `VisionTransformer` (without a
distillation token), both registered by the patch as `deit_digits_w64d4` and
`deit_digits_distilled_w64d4` (width 64, depth 4, 2 heads, patch 4); its teacher reads the same
weights. Its figure is main.py's own last evaluation (`test_acc1` of its log: the model's eval
output, the distilled student's heads averaged). Ours is `student_trainer train` under torchrun (2
CPU processes, half the batch each) with cached labels that `precompute` made for the run, and
the same recipe: the shards' augmentation policy (`--policy` overrides both codes'), `--epochs`,
batch `--batch-size`, lr `--lr` per 512 scaled, 2 warm-up epochs from 1e-6, min lr `--min-lr`,
weight decay 0.05, label smoothing 0.1, no drop path, no mixup, no repeated augmentation.

The figures: each code's plain and distilled top-1 (mean, std over seeds), its effect (distilled
minus plain, paired by seed: mean, std, standard error), and the differences between the codes
(official minus ours) with the standard error of each difference.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import Field

from distill_core import parse_script_args, to_argv

from common import OfficialCodeArgs

STUDENT = {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2}
OFFICIAL_MODELS = {"plain": "deit_digits_w64d4", "hard": "deit_digits_distilled_w64d4"}
OURS_MODELS = {"plain": "deit_tiny_patch16_224", "hard": "deit_tiny_distilled_patch16_224"}


class DeitCompare(OfficialCodeArgs):
    out: str = Field(description="output directory (image folder, labels, runs, runs.jsonl)")
    seeds: int = Field(3, ge=1, description="seeds per code and mode (0..N-1 from --first-seed)")
    first_seed: int = Field(0, ge=0, description="the first seed")
    codes: list[str] = Field(["official", "ours"], description="codes to run: official, ours")
    modes: list[str] = Field(["plain", "hard"], description="students: plain (no distillation token), hard")
    epochs: int = Field(40, ge=1, description="epochs of every run")
    batch_size: int = Field(64, ge=2, description="global batch")
    lr: float = Field(1.6e-2, gt=0, description="lr per 512 images, scaled linearly")
    min_lr: float = Field(1e-5, ge=0, description="the cosine schedule's final lr")
    policy: dict = Field(default_factory=dict, description="JSON augmentation policy overrides, for both codes")
    jobs: int = Field(2, ge=1, description="runs at a time")


def official_flags(cfg: DeitCompare, policy) -> list[str]:
    """main.py's flags for the recipe: the policy as DeiT's flags (its crop at <= 32 px is the padded
    one unless --keep-rrc, which the patch adds), the rest as ours."""
    flags = ["--input-size", str(policy.input_size), "--batch-size", str(cfg.batch_size), "--epochs", str(cfg.epochs),
             "--lr", str(cfg.lr), "--warmup-epochs", "2", "--warmup-lr", "1e-6", "--min-lr", str(cfg.min_lr),
             "--weight-decay", "0.05", "--smoothing", "0.1", "--drop-path", "0.0", "--mixup", "0", "--cutmix", "0",
             "--aa", policy.auto_augment or "", "--reprob", str(policy.re_prob), "--hflip", str(policy.hflip),
             "--rrc-scale-min", str(policy.scale[0]), "--color-jitter", str(policy.color_jitter),
             "--num_workers", "1", "--no-pin-mem", "--no-repeated-aug", "--device", "cpu"]  # fmt: skip
    if policy.crop == "resized":
        flags.append("--keep-rrc")
    return flags


def run_official(cfg: DeitCompare, policy, mode: str, seed: int, folder: Path, teacher_pth: Path) -> dict:
    run = Path(cfg.out) / "runs" / f"official-{mode}-s{seed}"
    run.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "main.py", "--model", OFFICIAL_MODELS[mode], "--data-set", "IMNET", "--data-path",
            str(folder), "--seed", str(seed), "--output_dir", str(run), "--distillation-type",
            "none" if mode == "plain" else "hard", *official_flags(cfg, policy)]  # fmt: skip
    if mode == "hard":
        argv += ["--teacher-model", cfg.teacher_model, "--teacher-path", str(teacher_pth)]
    env = official_env(cfg)
    with open(run / "stdout.txt", "w") as log:
        p = subprocess.run(argv, cwd=cfg.official_code, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"official {mode} seed {seed} failed ({p.returncode}): see {run / 'stdout.txt'}")
    last = json.loads((run / "log.txt").read_text().splitlines()[-1])  # main.py's epoch records
    return {"top1": last["test_acc1"], "epochs": last["epoch"] + 1}


def run_ours(cfg: DeitCompare, mode: str, seed: int, store: Path) -> dict:
    from student_trainer.config import TrainConfig

    run = Path(cfg.out) / "runs" / f"ours-{mode}-s{seed}"
    fields = dict(
        shards=cfg.shards, out=str(run), model=OURS_MODELS[mode], model_kwargs=STUDENT, seed=seed,
        labels="none" if mode == "plain" else "store", epochs=cfg.epochs, batch_size=cfg.batch_size // 2,
        repeated_aug=1, lr=cfg.lr, warmup_epochs=2, min_lr=cfg.min_lr, drop_path=0.0, mixup=0.0, cutmix=0.0,
        workers=1, threads=1, eval_every=cfg.epochs, progress=False,
    )  # fmt: skip
    if mode == "hard":
        fields["store"] = str(store)
    if cfg.policy:
        fields["policy"] = cfg.policy
    for stale in ("last.pt", "metrics.jsonl"):
        (run / stale).unlink(missing_ok=True)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "student_trainer", "train", *to_argv(TrainConfig(**fields))]  # fmt: skip
    run.mkdir(parents=True, exist_ok=True)
    with open(run.with_suffix(".log"), "w") as log:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=log, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"ours {mode} seed {seed} failed ({p.returncode}): see {run.with_suffix('.log')}")
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    return {"top1": summary["val_top1"], "epochs": summary["epochs_done"]}


def official_env(cfg: DeitCompare) -> dict:
    return {**os.environ, "PYTHONPATH": f"{cfg.official_libs}{os.pathsep}{cfg.official_code}",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip


def teacher_id(path: str | Path) -> str:
    """The teacher file's identity: the first 16 hex digits of its bytes' SHA-256."""
    from shards.manifest import sha256_file

    return sha256_file(path)[:16]


def claim_teacher(out: Path, teacher: str | Path, mine: str) -> None:
    """OUT's teacher.pth and labels are made once from one teacher file (`mine`, its `teacher_id`): a
    second call with another file is refused, since its runs would be labelled by the first (and
    its rows mixed with them)."""
    claim = out / "teacher.id"
    if claim.exists() and claim.read_text().strip() != mine:
        raise SystemExit(f"{out} holds runs of teacher {claim.read_text().strip()}, not of {teacher} ({mine}): "
                         "give another --out")  # fmt: skip
    claim.write_text(mine + "\n")


def prepare(cfg: DeitCompare, policy) -> tuple[Path, Path, Path]:
    """The official side's image folder and teacher file, and our labels for the run (each made once)."""
    from labels.teacher import TeacherSettings
    from teacher_service.precompute import PrecomputeConfig

    from common import imagefolder_of_shards

    out = Path(cfg.out)
    folder = out / "imagefolder"
    if not (folder / "val").exists():
        for split in ("train", "val"):
            imagefolder_of_shards(cfg.shards, split, folder / split)
    teacher_pth = out / "teacher.pth"
    if not teacher_pth.exists():  # timm 0.4.12's model of the same weights, as DeiT's --teacher-path loads it
        code = (
            "import sys, timm, torch; from safetensors.torch import load_file; "
            "m = timm.create_model(sys.argv[1], num_classes=int(sys.argv[2]), global_pool='avg'); "
            "m.load_state_dict(load_file(sys.argv[3]), strict=True); "
            "torch.save({'model': m.state_dict()}, sys.argv[4])"
        )
        classes = len(json.loads((Path(cfg.shards) / "manifest.json").read_text())["classes"])
        subprocess.run([sys.executable, "-c", code, cfg.teacher_model, str(classes), cfg.teacher, str(teacher_pth)],
                       env=official_env(cfg), check=True)  # fmt: skip
    store = out / "labels.db"
    done = out / "labels.json"
    if "ours" in cfg.codes and "hard" in cfg.modes and not done.exists():
        job = PrecomputeConfig(shards=cfg.shards, store=str(store), epochs=cfg.epochs, repeated_aug=1,
                               teacher=TeacherSettings(checkpoint=cfg.teacher), workers=1, progress=False,
                               policy=cfg.policy, quality_labels=20_000)  # fmt: skip
        p = subprocess.run([sys.executable, "-m", "teacher_service", "precompute", *to_argv(job)],
                           stdout=subprocess.PIPE, text=True, check=True)  # fmt: skip
        done.write_text(p.stdout.strip().splitlines()[-1])
    return folder, teacher_pth, store


def stats(values: list[float]) -> dict:
    n = len(values)
    sd = statistics.stdev(values) if n > 1 else None
    return {"mean": round(statistics.mean(values), 3), "std": sd and round(sd, 3),
            "se": sd and round(sd / math.sqrt(n), 3), "n": n}  # fmt: skip


def figures(rows: list[dict], codes: list[str]) -> dict:
    out: dict = {}
    for code in codes:
        top = {
            m: {r["seed"]: r["top1"] for r in rows if r["code"] == code and r["mode"] == m} for m in ("plain", "hard")
        }
        paired = sorted(set(top["plain"]) & set(top["hard"]))
        out[code] = {m: stats(list(top[m].values())) for m in top if top[m]}
        if paired:
            out[code]["effect"] = stats([top["hard"][s] - top["plain"][s] for s in paired])
            out[code]["effect"]["per_seed"] = [round(top["hard"][s] - top["plain"][s], 2) for s in paired]
    if all(c in out for c in ("official", "ours")):
        diff = {}
        for what in ("plain", "hard", "effect"):
            a, b = out["official"].get(what), out["ours"].get(what)
            if a and b and a["se"] is not None and b["se"] is not None:
                se = math.hypot(a["se"], b["se"])
                diff[what] = {"official_minus_ours": round(a["mean"] - b["mean"], 3), "se": round(se, 3),
                              "in_se": round((a["mean"] - b["mean"]) / se, 2) if se else None}  # fmt: skip
        out["difference"] = diff
    return out


def main() -> None:
    cfg = parse_script_args(DeitCompare, __doc__)
    from shards import Manifest

    policy = Manifest.load(cfg.shards).policy(**cfg.policy)
    if policy.renderer != "pil":
        raise SystemExit("compares the pil renderer (timm's transform), the one the official code runs too")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    teacher = teacher_id(cfg.teacher)  # hashed once: the claim on OUT and every row's recipe
    claim_teacher(out, cfg.teacher, teacher)
    folder, teacher_pth, store = prepare(cfg, policy)
    recipe = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "min_lr": cfg.min_lr,
              "policy_id": policy.policy_id, "teacher": teacher}  # fmt: skip
    have = {(r["code"], r["mode"], r["seed"]) for r in rows if {k: r.get(k) for k in recipe} == recipe}
    todo = [(code, mode, seed) for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds) for mode in cfg.modes
            for code in cfg.codes if (code, mode, seed) not in have]  # fmt: skip

    def one(job):
        code, mode, seed = job
        t0 = time.perf_counter()
        got = (
            run_official(cfg, policy, mode, seed, folder, teacher_pth)
            if code == "official"
            else run_ours(cfg, mode, seed, store)
        )
        row = {"code": code, "mode": mode, "seed": seed, **got, "seconds": round(time.perf_counter() - t0), **recipe}
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(cfg.jobs) as pool:
        rows += list(pool.map(one, todo))
    mine = [r for r in rows if {k: r.get(k) for k in recipe} == recipe]
    print(json.dumps({"recipe": recipe, "shards": cfg.shards, "figures": figures(mine, cfg.codes)}))


if __name__ == "__main__":
    main()
