"""What the student sees, ours against the official DeiT code: the same images through each code's
training transform, counted. One JSON line.

    python bench/deit_transforms.py --shards runs/demo/shards --teacher runs/demo/teacher/model.safetensors \
        --official-code DEIT_CHECKOUT --official-libs OLD_LIBS

Ours is `shards.augment.augment` (the pil renderer: timm 1.0's transform under each crop's seed);
the official one is DeiT's `datasets.build_transform(True, args)` on timm 0.4.12 and Pillow 9.5
(`--official-libs`, a folder holding both; `--official-code`, a checkout of DeiT 7e160fe that
takes the crop and flip as flags), run in a process of its own over an ImageFolder of the same
image bytes, its random generators seeded once as DeiT's main.py seeds them. Each code makes
`--crops-per-image` crops of every training image (ours: seeds 0, 1, ...; theirs: that many passes).

Counted on each side: the crop (padded: the offset in the padded image; resized: the box's share
of the image), the flip, every RandAugment op (how often applied, its argument), the erased boxes,
per-channel pixel means and standard deviations, and how often the teacher's hard label on the
crop is the image's class. Each figure is given for both codes with the difference in standard
errors (`z`); |z| above 4 is a difference that chance does not explain.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

BATCH = 256


def instrument(transform, counts: dict) -> None:
    """Wrap the transform's stages so that each crop's draws are counted into `counts`."""
    crop, *rest = transform.transforms
    padding = getattr(crop, "padding", None)
    get_params = crop.get_params

    def crop_params(img, *a, **kw):
        i, j, h, w = get_params(img, *a, **kw)
        if padding:  # RandomCrop: the offset from the unpadded position
            counts["crop_offset_y"].append(i - padding)
            counts["crop_offset_x"].append(j - padding)
        else:
            width, height = img.size
            counts["crop_area_share"].append(h * w / (width * height))
        return i, j, h, w

    crop.get_params = crop_params
    for stage in rest:
        if type(stage).__name__ == "RandomHorizontalFlip":
            forward = stage.forward

            def flip(img, forward=forward):
                out = forward(img)
                counts["flipped"].append(out is not img)
                return out

            stage.forward = flip
        for op in getattr(stage, "ops", ()):
            fn = op.aug_fn

            def applied(img, *args, name=op_name(op), fn=fn, **kw):
                counts[f"op.{name}"].append(float(args[0]) if args else 1.0)
                return fn(img, *args, **kw)

            op.aug_fn = applied
    import timm.data.random_erasing as erasing

    get_pixels = erasing._get_pixels

    def erased(per_pixel, rand_color, patch_size, *a, **kw):
        counts["erase_h"].append(patch_size[1])
        counts["erase_w"].append(patch_size[2])
        return get_pixels(per_pixel, rand_color, patch_size, *a, **kw)

    erasing._get_pixels = erased


def op_name(op) -> str:
    """A RandAugment op's name (timm 0.4.12's ops have none: found by their functions)."""
    if hasattr(op, "name"):
        return op.name
    import timm.data.auto_augment as aa

    (name,) = [n for n in aa._RAND_INCREASING_TRANSFORMS
               if aa.NAME_TO_OP[n] is op.aug_fn and aa.LEVEL_TO_ARG[n] is op.level_fn]  # fmt: skip
    return name


def collect(crops, teacher) -> dict:
    """Figures of an iterator of (crop tensor, class, draws of that crop) and a teacher."""
    channel_means, channel_stds, agree, batch, classes, n = [], [], 0, [], [], 0
    for x, cls in crops:
        channel_means.append(x.double().mean((1, 2)))
        channel_stds.append(x.double().std((1, 2)))
        batch.append(x)
        classes.append(cls)
        n += 1
        if len(batch) == BATCH:
            agree += teacher_agrees(teacher, batch, classes)
            batch, classes = [], []
    if batch:
        agree += teacher_agrees(teacher, batch, classes)
    means, stds = torch.stack(channel_means), torch.stack(channel_stds)
    return {
        "crops": n,
        "teacher_agrees": agree,
        "channel_mean": means.mean(0).tolist(),
        "channel_mean_se": (means.std(0) / math.sqrt(n)).tolist(),
        "channel_std": stds.mean(0).tolist(),
        "channel_std_se": (stds.std(0) / math.sqrt(n)).tolist(),
    }


@torch.no_grad()
def teacher_agrees(teacher, batch: list, classes: list) -> int:
    return int((teacher(torch.stack(batch)).argmax(1) == torch.tensor(classes)).sum())


def summarize_draws(counts: dict, crops: int) -> dict:
    out = {}
    for name, values in sorted(counts.items()):
        v = np.asarray(values, dtype=np.float64)
        out[name] = {"n": len(v), "mean": float(v.mean()) if len(v) else None,
                     "std": float(v.std()) if len(v) > 1 else None,
                     "abs_mean": float(np.abs(v).mean()) if len(v) else None,
                     "abs_std": float(np.abs(v).std()) if len(v) > 1 else None}  # fmt: skip
    out["crops"] = crops
    return out


# -- the official side (its own process: timm 0.4.12, Pillow 9.5, DeiT's datasets.py) ------------------


def official_side(spec: dict) -> dict:
    sys.path.insert(0, spec["official_code"])
    import argparse

    import timm
    from datasets import build_transform  # DeiT's
    from safetensors.torch import load_file
    from torchvision.datasets import ImageFolder

    policy = spec["policy"]
    args = argparse.Namespace(
        input_size=policy["input_size"], color_jitter=policy["color_jitter"], aa=policy["auto_augment"],
        train_interpolation=policy["interpolation"], reprob=policy["re_prob"], remode=policy["re_mode"],
        recount=policy["re_count"], rrc_scale_min=policy["scale"][0], hflip=policy["hflip"],
        keep_rrc=policy["crop"] == "resized",
    )  # fmt: skip
    transform = build_transform(True, args)
    counts: dict[str, list] = defaultdict(list)
    instrument(transform, counts)
    torch.manual_seed(0)  # main.py: torch and numpy, once (Python's random is not seeded there)
    np.random.seed(0)
    random.seed(0)
    folder = ImageFolder(spec["folder"], transform=transform)
    teacher = timm.create_model(spec["teacher_model"], num_classes=len(folder.classes), global_pool="avg")
    teacher.load_state_dict(load_file(spec["teacher"]), strict=True)
    teacher.eval()
    passes = ((folder[i][0], folder.targets[i]) for _ in range(spec["crops_per_image"]) for i in range(len(folder)))
    figures = collect(passes, teacher)
    return {
        "code": f"DeiT 7e160fe, timm {timm.__version__}",
        **figures,
        "draws": summarize_draws(counts, figures["crops"]),
    }


# -- our side ----------------------------------------------------------------------------------------------


def our_side(cfg) -> tuple[dict, dict]:
    """Our figures, and the spec the official side runs from (the same images and recipe)."""
    import timm
    from safetensors.torch import load_file

    from shards import Manifest, SkipCounter, iter_shard
    from shards.augment import augment, train_transform
    from shards.decode import decode_image

    from common import imagefolder_of_shards

    manifest = Manifest.load(cfg.shards)
    policy = manifest.policy(**cfg.policy)
    if policy.renderer != "pil":
        raise SystemExit("compares the pil renderer (timm's transform), the one the official code also runs")
    samples = [
        s for shard in manifest.shards("train") for s in iter_shard(Path(cfg.shards) / shard.name, SkipCounter())
    ]
    counts: dict[str, list] = defaultdict(list)
    instrument(train_transform(policy), counts)
    teacher = timm.create_model(cfg.teacher_model, num_classes=len(manifest.classes))
    teacher.load_state_dict(load_file(cfg.teacher), strict=True)
    teacher.eval()
    images = [(s.key, decode_image(s.data), s.label) for s in samples]
    crops = ((augment(im, key, seed, policy), cls) for seed in range(cfg.crops_per_image) for key, im, cls in images)
    figures = collect(crops, teacher)
    import timm as t

    draws = summarize_draws(counts, figures["crops"])
    ours = {"code": f"ours, timm {t.__version__}", "policy_id": policy.policy_id, **figures, "draws": draws}
    folder = imagefolder_of_shards(cfg.shards, "train", tempfile.mkdtemp(prefix="deit-transforms-"))
    spec = {
        "official_code": cfg.official_code,
        "policy": policy.to_dict(),
        "folder": str(folder),
        "teacher": cfg.teacher,
        "teacher_model": cfg.teacher_model,
        "crops_per_image": cfg.crops_per_image,
    }
    return ours, spec


def z(a: float, b: float, se_a: float, se_b: float) -> float | None:
    se = math.hypot(se_a, se_b)
    return round((a - b) / se, 2) if se > 0 else None


def compare(ours: dict, theirs: dict) -> dict:
    """Each figure side by side, with the difference in standard errors."""
    rows = {}
    n_o, n_t = ours["crops"], theirs["crops"]
    for c in range(3):
        for stat in ("channel_mean", "channel_std"):
            a, b = ours[stat][c], theirs[stat][c]
            rows[f"{stat}[{c}]"] = {"ours": round(a, 4), "official": round(b, 4),
                                    "z": z(a, b, ours[f"{stat}_se"][c], theirs[f"{stat}_se"][c])}  # fmt: skip
    pa, pb = ours["teacher_agrees"] / n_o, theirs["teacher_agrees"] / n_t
    se_a, se_b = math.sqrt(pa * (1 - pa) / n_o), math.sqrt(pb * (1 - pb) / n_t)
    rows["teacher_agrees_pct"] = {
        "ours": round(100 * pa, 2),
        "official": round(100 * pb, 2),
        "z": z(pa, pb, se_a, se_b),
    }
    for name in sorted(set(ours["draws"]) | set(theirs["draws"])):
        if name == "crops":
            continue
        a, b = ours["draws"].get(name, {"n": 0}), theirs["draws"].get(name, {"n": 0})
        fa, fb = a["n"] / n_o, b["n"] / n_t  # how often, per crop
        row = {"per_crop_ours": round(fa, 4), "per_crop_official": round(fb, 4),
               "z_count": z(fa, fb, math.sqrt(fa / n_o), math.sqrt(fb / n_t))}  # fmt: skip
        for stat in ("mean", "abs_mean"):  # the argument's (offset's, share's) mean, and its size's
            sd = stat.replace("mean", "std")
            if a.get(sd) and b.get(sd):
                se_a, se_b = a[sd] / math.sqrt(a["n"]), b[sd] / math.sqrt(b["n"])
                row[f"{stat}_ours"], row[f"{stat}_official"] = round(a[stat], 4), round(b[stat], 4)
                row[f"z_{stat}"] = z(a[stat], b[stat], se_a, se_b)
        rows[name] = row
    worst = max((abs(v) for r in rows.values() for k, v in r.items() if k.startswith("z") and v is not None), default=0)
    return {"max_abs_z": worst, "rows": rows}


def main() -> None:
    from pydantic import Field

    from distill_core import parse_script_args

    from common import OfficialCodeArgs

    class DeitTransforms(OfficialCodeArgs):
        crops_per_image: int = Field(7, ge=1, description="crops of each image, per code")
        policy: dict = Field(default_factory=dict, description="JSON policy overrides (else the shards' hint)")

    cfg = parse_script_args(DeitTransforms, __doc__)
    torch.set_num_threads(1)
    ours, spec = our_side(cfg)
    env = {**os.environ, "PYTHONPATH": cfg.official_libs, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, __file__, "--official-side", json.dumps(spec)], env=env, capture_output=True,
                       text=True, check=False)  # fmt: skip
    if p.returncode != 0:
        raise SystemExit(f"the official side failed:\n{p.stderr[-3000:]}")
    theirs = json.loads(p.stdout.strip().splitlines()[-1])
    print(json.dumps({"ours": ours, "official": theirs, "compare": compare(ours, theirs)}))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--official-side":
        torch.set_num_threads(1)
        print(json.dumps(official_side(json.loads(sys.argv[2]))))
    else:
        main()
