"""Data-path throughput, per core: shards build on the demo digits, and DeiT's 224 px training crop
on ImageNet-shaped JPEGs with both renderers, stage by stage. Prints one JSON line.

python bench/data.py [--n 200] [--batch 64]

- `pil_*`: timm's transform (the `pil` renderer), each stage of its Compose timed on its own under
  the crop's seed: decode, crop+resize (RandomResizedCrop), flip, RandAugment, to-tensor +
  normalise, erasing.
- `torch_*`: the torch renderer on this CPU: decode (the same PIL decode), crop (parameters drawn,
  the box cut, resized and flipped by Pillow: what a loader worker does for the device), then
  `render_batch`'s stages, rendered as a batch of `--batch` crops;
  `torch_single_*` renders one crop at a time, as the label engine's CPU workers do.
- `torch_vs_pil_224`: the torch renderer's crops/s against pil's, both with decode, one core
  (`_without_decode`: the renderers alone).
- `decode_draft_vs_full`: libjpeg's scaled (DCT-domain) decode at 1/2 size against a full decode,
  what a renderer that downscales anyway could save (not used: it changes pixels).
"""

import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from pydantic import BaseModel, Field

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_core import parse_script_args  # noqa: E402
from shards import AugmentPolicy, Manifest, SkipCounter, augment, cut_crop, decode_image, iter_shard  # noqa: E402
from shards.augment import sample_seed, seeded_rng, train_transform  # noqa: E402
from shards.build import BuildConfig, build  # noqa: E402
from shards.render import render_batch  # noqa: E402

from common import imagenet_like_jpegs  # noqa: E402


class BenchData(BaseModel):
    n: int = Field(200, ge=8, description="ImageNet-shaped JPEGs to crop per renderer")
    batch: int = Field(64, ge=1, description="crops per render_batch call of the torch renderer")
    demo_n: int = Field(500, ge=1, description="demo digits to augment at 32 px")


def per_core(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


def ms(seconds: float, n: int) -> float:
    return round(1000 * seconds / n, 3)


def pil_stages(images: list[Image.Image], policy: AugmentPolicy) -> dict:
    """Each stage of timm's Compose timed separately; the crop is the one `augment` gives."""
    transform = train_transform(policy)
    names = ["crop_resize", "flip", "randaugment", "to_tensor", "normalize", "erase"]
    stages = list(transform.transforms)
    assert len(stages) == len(names), transform
    times = dict.fromkeys(names, 0.0)
    check = []
    for i, image in enumerate(images):
        x = image
        with seeded_rng(sample_seed(policy.policy_id, f"k{i}", 0)):
            for name, stage in zip(names, stages):
                t = time.perf_counter()
                x = stage(x)
                times[name] += time.perf_counter() - t
        check.append(x)
    assert torch.equal(check[0], augment(images[0], "k0", 0, policy))  # timed what augment does
    return times


def torch_stages(images: list[Image.Image], policy: AugmentPolicy, batch: int) -> tuple[dict, torch.Tensor]:
    times = {"crop": 0.0}
    prepared, out = [], []
    for i, image in enumerate(images):
        t = time.perf_counter()
        prepared.append(cut_crop(image, f"k{i}", 0, policy))
        times["crop"] += time.perf_counter() - t
    for b in range(0, len(prepared), batch):
        crops, params = zip(*prepared[b : b + batch])
        out.append(render_batch(torch.stack(crops), list(params), policy, "cpu", timings=times))
    return times, torch.cat(out)


def main():
    args = parse_script_args(BenchData, __doc__)
    torch.set_num_threads(1)  # per-core figures
    out = {}
    with tempfile.TemporaryDirectory() as d:
        out["build_images_per_s"] = build(BuildConfig(out=d, demo="digits", shard_size=128))["images_per_s"]
        m = Manifest.load(d)
        raws = [r for s in m.shards("train")[:4] for r in iter_shard(f"{d}/{s.name}", SkipCounter())][: args.demo_n]
        for name, policy in (("pil", m.policy()), ("torch", m.policy("torch"))):
            images = [decode_image(r.data) for r in raws]
            for r, im in zip(raws[:20], images):  # warm-up: transform construction, imports
                augment(im, r.key, 1, policy)
            t0 = time.perf_counter()
            for r, im in zip(raws, images):
                augment(im, r.key, 0, policy)
            out[f"demo32_{name}_crops_per_s_per_core"] = per_core(len(raws), time.perf_counter() - t0)

    jpegs = imagenet_like_jpegs(args.n)
    out["jpeg_kb_mean"] = round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1)
    t0 = time.perf_counter()  # both renderers decode the same way on the CPU: timed once
    images = [decode_image(j) for j in jpegs]
    decode = time.perf_counter() - t0
    pil, tch = AugmentPolicy(), AugmentPolicy(renderer="torch")
    pil_stages(images[:8], pil), torch_stages(images[:8], tch, args.batch)  # warm-up
    p = {"decode": decode, **pil_stages(images, pil)}
    t, crops = torch_stages(images, tch, args.batch)
    t = {"decode": decode, **t}
    n = len(jpegs)
    out["pil_ms"] = {k: ms(v, n) for k, v in p.items()}
    out["torch_ms"] = {k: ms(v, n) for k, v in t.items()}
    out["pil_crops_per_s_per_core"] = per_core(n, sum(p.values()))
    out["torch_crops_per_s_per_core"] = per_core(n, sum(t.values()))
    out["torch_vs_pil_224"] = round(sum(p.values()) / sum(t.values()), 3)
    out["torch_vs_pil_224_without_decode"] = round((sum(p.values()) - decode) / (sum(t.values()) - decode), 3)
    # one crop per call, as the label engine's CPU workers render; must equal the batched crops
    images = images[:50]
    t0 = time.perf_counter()
    single = [augment(im, f"k{i}", 0, tch) for i, im in enumerate(images)]
    out["torch_single_ms_without_decode"] = ms(time.perf_counter() - t0, len(images))
    out["batched_equals_single"] = bool(torch.equal(torch.stack(single), crops[:50]))
    # scaled decode: libjpeg's DCT-domain reduction to 1/2
    t0 = time.perf_counter()
    for j in jpegs:
        Image.open(io.BytesIO(j)).convert("RGB")
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    for j in jpegs:
        im = Image.open(io.BytesIO(j))
        im.draft("RGB", (im.width // 2, im.height // 2))
        im.convert("RGB")
    out["decode_draft_vs_full"] = round(full / (time.perf_counter() - t0), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
