"""Ablations of the demo's recipe, one difference from DeiT's code at a time
(docs/deit-side-by-side.md); one JSON line per variant.

python bench/ablations.py --out runs/ablations --seeds 5

`ours` is the demo as it is. Each other variant switches one choice away from today's defaults:
to this trainer's choice before 2026-12-05, where DeiT's is now the default (rows 4, 5, 12), or to
DeiT's, where ours stays (row 18). It runs the demo's plain and cached students over the same
seeds. The shards, teacher and labels are made once in OUT/base and shared:
a variant whose policy differs precomputes its own labels. Each line gives the distilled-minus-plain
effect paired by seed (mean, std, per seed), both top-1s (the distilled student's: its own
prediction, the heads' logits averaged, as DeiT's), the fused prediction by averaged
probabilities beside it, read from the same runs, and the label quality of the labels the variant
trains on. The last line is the whole table.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from pydantic import BaseModel, Field

from distill_core import parse_script_args
from distill_demo.demo import DemoConfig, run_demo

VARIANTS = {  # name: DemoConfig fields
    "ours": {},
    # row 13 (DeiT evaluates a 32 px image whole) needs no variant: the demo's policy does already
    "lr_per_step": {"student_flags": {"sched_on_epochs": False}},  # row 5: ours before
    "min_lr_scaled": {"student_flags": {"scale_min_lr": True}},  # row 4: ours before
    "resized_crop": {"policy": {"crop": "resized"}},  # row 12: ours before, RandomResizedCrop 0.5-1
    "hflip": {"policy": {"hflip": 0.5}},  # row 18: DeiT's code has no flip flag: timm's 0.5; ours: none
}


class Ablations(BaseModel):
    out: str = Field("runs/ablations", description="output directory (OUT/base: shards, teacher, labels)")
    seeds: int = Field(5, ge=1, description="student seeds per variant and mode")
    variants: list[str] = Field(list(VARIANTS), description=f"variants to run, of: {', '.join(VARIANTS)}")


def main() -> None:
    args = parse_script_args(Ablations, __doc__)
    out = Path(args.out)
    base = out / "base"
    lines = []
    for name in args.variants:
        fields = VARIANTS[name]
        run_dir = base if name == "ours" else out / name
        if run_dir != base and not (run_dir / "shards").exists():  # the same shards, teacher and labels
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "shards").symlink_to((base / "shards").resolve())
            (run_dir / "teacher").symlink_to((base / "teacher").resolve())
            if "policy" not in fields:  # another policy's labels are made afresh, in a store of their own
                shutil.copy(base / "labels.db", run_dir / "labels.db")
            (run_dir / "logs").mkdir()
            shutil.copy(base / "logs" / "teacher.json", run_dir / "logs" / "teacher.json")  # the teacher's summary
        result = run_demo(DemoConfig(out=str(run_dir), seeds=args.seeds, modes=["plain", "cached"], **fields))
        rows = {r["mode"]: r for r in result["results"]}
        line = {
            "variant": name,
            "fields": fields,
            "seeds": args.seeds,
            "plain_top1": rows["plain"]["top1"],
            "cached_top1": rows["cached"]["top1"],
            "cached_top1_fused_probs": rows["cached"]["top1_fused_probs"],
            "cached_minus_plain": rows["cached"]["minus_plain"],  # paired by seed
            "cached_minus_plain_per_seed": rows["cached"]["minus_plain_per_seed"],
            "label_quality_pct": (result.get("label_quality") or {}).get("agree_pct"),
        }
        print(json.dumps(line), flush=True)
        lines.append(line)
    print(json.dumps({"ablations": lines}), file=sys.stdout)


if __name__ == "__main__":
    main()
