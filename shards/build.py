"""Build webdataset shards (+ member indexes, manifest) from an image folder or the bundled demo data set."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import webdataset as wds
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from .decode import decode_image
from .index import write_index
from .manifest import Manifest, ShardInfo, sha256_file
from .params import check_padded_fits
from .policy import SMALL_INPUT

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"}
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")

# The demo is digits: a horizontal flip turns a valid digit into something else, and a tiny ViT
# trained on 1,437 images for a few minutes needs milder RandAugment and erasing than ImageNet
# does. The ops stay DeiT's. Its crop is DeiT's at 32 px (`small_input_hint`); the scale is what
# RandomResizedCrop would take (`"crop": "resized"`): 8x8 sources upscaled to 32 px do not survive
# DeiT's 8% crops.
DEMO_POLICY_HINT = {
    "input_size": 32,
    "scale": [0.5, 1.0],
    "hflip": 0.0,
    "auto_augment": "rand-m3-mstd0.5-inc1",
    "re_prob": 0.1,
    "eval_crop_pct": 1.0,
}


def small_input_hint(input_size: int) -> dict:
    """DeiT's transforms at an input of 32 px or less (its datasets.build_transform, CIFAR's
    recipe): RandomCrop(input_size, padding=4) of the image as it is instead of RandomResizedCrop,
    and the whole image at eval."""
    return {"crop": "padded", "eval_crop_pct": 1.0} if input_size <= SMALL_INPUT else {}


@dataclass
class Sample:
    key: str
    label: int
    data: bytes
    ext: str


def stable_fraction(text: str) -> float:
    """A number in [0, 1) from a stable hash of text (split assignment that never moves)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") / 2**64


def make_key(relpath: str) -> str:
    """A webdataset-safe key from a relative path: no dots (webdataset splits at the first dot)."""
    stem = relpath.rsplit(".", 1)[0] if "." in Path(relpath).name else relpath
    return _KEY_UNSAFE.sub("_", stem)


def scan_folder(src: Path, flag: str = "--src") -> tuple[list[str], list[tuple[str, int]]]:
    """ImageNet layout: one sub-folder per class. Returns classes and (relpath, label)."""
    if not src.is_dir():
        raise FileNotFoundError(f"{flag} {src} is not a directory")
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{src} has no class sub-folders (expected ImageNet layout: SRC/<class>/<image>)")
    items = []
    for label, cls in enumerate(classes):
        for root, _, files in os.walk(src / cls):
            for f in sorted(files):
                if Path(f).suffix.lower() in IMAGE_EXTS:
                    items.append((str(Path(root, f).relative_to(src)), label))
    items.sort()
    if not items:
        raise ValueError(f"{src} has class folders but no images with extensions {sorted(IMAGE_EXTS)}")
    return classes, items


def unique_keys(relpaths: Iterable[str]) -> dict[str, str]:
    """relpath -> key; colliding sanitized keys get a short digest of the original path."""
    keys: dict[str, str] = {}
    seen: set[str] = set()
    for rel in relpaths:
        k = make_key(rel)
        if k in seen:
            k = f"{k}_{hashlib.sha256(rel.encode()).hexdigest()[:8]}"
        seen.add(k)
        keys[rel] = k
    return keys


def image_file_problem(path: Path, crop_fits=None) -> tuple[str, str, bytes | None]:
    """(reason, detail, bytes) of one file of an image folder: reason "" and its bytes when it may
    enter a shard. Only regular files are read (a link is followed to one; a FIFO or a device is
    never opened, so it cannot hang the build); the image must decode fully, as every reader will
    decode it (a JPEG cut at its tail passes a header check and fails each later decode); and
    `crop_fits(width, height)` (the hinted policy's training crop) must not raise."""
    try:
        mode = os.stat(path).st_mode  # follows links: a dangling one or a loop raises here
    except OSError as e:
        return "unreadable", e.strerror or str(e), None
    if not stat.S_ISREG(mode):
        return "not a regular file", "a FIFO, socket or device", None
    try:
        data = path.read_bytes()
    except OSError as e:
        return "unreadable", e.strerror or str(e), None
    try:
        image = decode_image(data)
    except ValueError as e:
        return "undecodable", str(e), None
    if crop_fits is not None:
        try:
            crop_fits(image.width, image.height)
        except ValueError as e:
            return "too small for the crop", str(e), None
    return "", "", data


def folder_samples(
    src: Path, items: list[tuple[str, int]], keys: dict[str, str], stats: dict, crop_fits=None
) -> Iterator[Sample]:
    """The samples of an image folder's files that may enter a shard (`image_file_problem`); each
    other file is one log line and counted in `stats` by its reason."""
    for rel, label in items:
        path = src / rel
        reason, detail, data = image_file_problem(path, crop_fits)
        if reason:
            stats["skipped"] += 1
            stats["skipped_by_reason"][reason] = stats["skipped_by_reason"].get(reason, 0) + 1
            log.warning("skipping %s: %s (%s)", path, reason, detail)
            continue
        yield Sample(keys[rel], label, data, Path(rel).suffix.lower().lstrip(".").replace("jpeg", "jpg"))


def digits_samples(size: int = 32) -> tuple[list[str], list[tuple[str, Sample]]]:
    """scikit-learn's 8x8 digits, upscaled (bicubic) to size x size RGB PNGs, with a fixed split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise SystemExit("the digits demo needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    out = []
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        arr = (img * (255.0 / 16.0)).clip(0, 255).astype("uint8")
        im = Image.fromarray(arr, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=False)
        split = "val" if i % 5 == 0 else "train"  # fixed split: every fifth image is validation
        out.append((split, Sample(f"digits/{int(label)}/{i:05d}", int(label), buf.getvalue(), "png")))
    return [str(c) for c in range(10)], out


def write_example_folder(
    out: str | os.PathLike, train_per_class: int = 8, val_per_class: int = 4, size: int = 32
) -> dict:
    """scikit-learn's digits as an image folder in ImageNet's layout, to try the commands that take
    your data: OUT/train/<class>/digit_NNNN.jpg and OUT/val/<class>/..., the first images of each
    class for train, the next for val (NNNN: the image's index in the data set)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise SystemExit("the example folder needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    out = Path(out)
    taken: dict[int, int] = {}
    written = {"train": 0, "val": 0}
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        n = taken.get(int(label), 0)
        if n >= train_per_class + val_per_class:
            continue
        taken[int(label)] = n + 1
        split = "train" if n < train_per_class else "val"
        arr = (img * (255.0 / 16.0)).clip(0, 255).astype("uint8")
        im = Image.fromarray(arr, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
        path = out / split / str(int(label)) / f"digit_{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, format="JPEG", quality=95)
        written[split] += 1
    return {"out": str(out), "classes": len(taken), "images": written}


def write_split(samples: Iterable[Sample], out: Path, split: str, shard_size: int, bar: tqdm) -> list[ShardInfo]:
    """Stream samples into split-NNNNNN.tar shards, each atomically (tmp file, then rename)."""
    infos: list[ShardInfo] = []
    it = iter(samples)
    while True:
        name = f"{split}-{len(infos):06d}.tar"
        tmp = out / (name + ".tmp")
        count = 0
        try:
            with wds.TarWriter(str(tmp)) as sink:
                for s in it:
                    sink.write({"__key__": s.key, s.ext: s.data, "cls": str(s.label).encode()})
                    bar.update(1)
                    count += 1
                    if count == shard_size:
                        break
        except BaseException:  # a failed build leaves no temporary file
            tmp.unlink(missing_ok=True)
            raise
        if count == 0:
            tmp.unlink()
            return infos
        os.replace(tmp, out / name)
        infos.append(
            ShardInfo(name=name, samples=count, bytes=(out / name).stat().st_size, sha256=sha256_file(out / name))
        )


class BuildConfig(BaseModel):
    """`shards build`'s flags."""

    model_config = ConfigDict(extra="forbid")

    out: Path = Field(description="output directory for .tar shards and manifest.json")
    src: Path | None = Field(None, description="image folder, one sub-folder per class (ImageNet train layout)")
    val_src: Path | None = Field(
        None, description="validation folder of the same classes (ImageNet val layout: DIR/<class>/*.JPEG)"
    )
    demo: Literal["digits"] | None = Field(None, description="bundled demo data set (scikit-learn digits)")
    shard_size: int = Field(1000, ge=1, description="samples per shard")
    val_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="without --val-src: fraction of --src held out as val (stable hash split)"
    )
    demo_size: int = Field(32, ge=8, description="demo image side in pixels")
    input_size: int | None = Field(
        None,
        ge=8,
        description="--src: crop side every command uses on these shards (default DeiT's 224); at <= 32 px, "
        "DeiT's small-image crop (RandomCrop with padding 4) and the whole image at eval",
    )
    seed: int = Field(0, description="seed of the fixed sample order inside shards")
    progress: bool = Field(True, description="progress bar")

    @model_validator(mode="after")
    def _one_source(self) -> BuildConfig:
        if (self.src is None) == (self.demo is None):
            raise ValueError("give exactly one of --src DIR or --demo digits")
        if self.input_size is not None and self.demo is not None:
            raise ValueError("--input-size is for --src shards (the demo's is --demo-size)")
        if self.val_src is not None and (self.demo is not None or self.val_fraction > 0):
            raise ValueError("--val-src is the val split of --src: not with --demo or --val-fraction")
        return self


@dataclass
class _Splits:
    """What a build writes: each split's shards, and what the manifest says of the source."""

    classes: list[str]
    source: str
    hint: dict
    val_from: dict
    scanned: int
    shards: dict[str, list[ShardInfo]] = field(default_factory=dict)


def build(cfg: BuildConfig) -> dict:
    """Build shards and manifest; returns a summary dict. The val split is `--val-src` (a folder of
    the same classes: the official validation set), else a stable hash holdout of
    `--val-fraction` of `--src`, else none; the manifest says which (`val_from`)."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stats = {"skipped": 0, "skipped_by_reason": {}}
    built = _demo_splits(cfg) if cfg.demo is not None else _folder_splits(cfg, stats)
    splits = {k: v for k, v in built.shards.items() if v}
    manifest = Manifest(
        classes=built.classes, splits=splits, source=built.source, policy_hint=built.hint, val_from=built.val_from
    )
    for split in splits:  # where each image is, so readers never walk the tar headers (index.py)
        manifest.indexes[split] = write_index(cfg.out, split, manifest)
    manifest.save(cfg.out)
    dt = time.perf_counter() - t0
    written = sum(manifest.num_samples(k) for k in splits)
    return {
        "out": str(cfg.out),
        "classes": len(built.classes),
        "samples": {k: manifest.num_samples(k) for k in splits},
        "shards": {k: len(v) for k, v in splits.items()},
        "skipped": stats["skipped"],
        "skipped_by_reason": stats["skipped_by_reason"],
        "seconds": round(dt, 3),
        "images_per_s": round(written / dt, 1) if dt > 0 else None,
        "scanned": built.scanned,
        "val_from": built.val_from,
    }


def _demo_splits(cfg: BuildConfig) -> _Splits:
    """The digits demo, its fixed split written into shards."""
    classes, pairs = digits_samples(cfg.demo_size)
    hint = {**DEMO_POLICY_HINT, "input_size": cfg.demo_size, **small_input_hint(cfg.demo_size)}
    out = _Splits(classes, f"demo:digits@{cfg.demo_size}px", hint, {"from": "fixed", "rule": "every fifth image"},
                  len(pairs))  # fmt: skip
    with tqdm(total=len(pairs), desc="shards", unit="img", disable=not cfg.progress) as bar:
        for split in ("train", "val"):
            samples = _mixed([s for sp, s in pairs if sp == split], cfg.seed, split, key=lambda s: s.key)
            out.shards[split] = write_split(samples, cfg.out, split, cfg.shard_size, bar)
    return out


def _folder_splits(cfg: BuildConfig, stats: dict) -> _Splits:
    """An image folder's train split (and val: `--val-src`, a holdout, or none) written into
    shards, each file that cannot become a training image skipped with its reason."""
    src = Path(cfg.src)
    classes, items = scan_folder(src)
    hint = {"input_size": cfg.input_size, **small_input_hint(cfg.input_size)} if cfg.input_size else {}  # else 224
    crop_fits = training_crop_check(Manifest(classes=classes, policy_hint=hint).policy())
    keys = unique_keys(rel for rel, _ in items)
    chosen, val_from = _val_split(cfg, src, classes, items, keys)
    total = sum(len(chosen_items) for _, chosen_items, _ in chosen.values())
    out = _Splits(classes, str(src.resolve()), hint, val_from, total)
    with tqdm(total=total, desc="shards", unit="img", disable=not cfg.progress) as bar:
        for split, (folder, split_items, split_keys) in chosen.items():
            if split_items:
                ordered = _mixed(split_items, cfg.seed, split, key=lambda it: it[0])
                fits = crop_fits if split == "train" else None  # eval resizes any image to the input
                samples = folder_samples(folder, ordered, split_keys, stats, fits)
                out.shards[split] = write_split(samples, cfg.out, split, cfg.shard_size, bar)
    return out


def _val_split(cfg: BuildConfig, src: Path, classes: list[str], items: list, keys: dict) -> tuple[dict, dict]:
    """{split: (folder, items, keys)} and `val_from`: the official val folder (its classes must be
    train's, its keys apart from train's), else a stable hash holdout of train, else none."""
    if cfg.val_src is not None:
        val_src = Path(cfg.val_src)
        val_classes, val_items = scan_folder(val_src, "--val-src")
        if val_classes != classes:
            only_train, only_val = sorted(set(classes) - set(val_classes)), sorted(set(val_classes) - set(classes))
            raise ValueError(
                f"--val-src {val_src} has other classes than --src {src}: "
                f"{len(only_train)} only in train (e.g. {only_train[:3]}), {len(only_val)} only in val "
                f"(e.g. {only_val[:3]})"
            )
        val_keys = unique_keys([*keys, *(f"val/{rel}" for rel, _ in val_items)])
        val_keys = {rel: val_keys[f"val/{rel}"] for rel, _ in val_items}
        return {"train": (src, items, keys), "val": (val_src, val_items, val_keys)}, {
            "from": "folder",
            "source": str(val_src.resolve()),
        }
    fraction = cfg.val_fraction
    held = [it for it in items if fraction > 0 and stable_fraction(keys[it[0]]) < fraction]
    held_set = set(held)
    log.info(
        "no --val-src: %s",
        f"holding out {len(held)} images of --src as val" if held else "no val split (evaluation is off)",
    )
    chosen = {"train": (src, [it for it in items if it not in held_set], keys), "val": (src, held, keys)}
    return chosen, ({"from": "holdout", "fraction": fraction} if held else {"from": "none"})


def training_crop_check(policy):
    """What the policy's training crop needs of an image's size (a padded crop: the image, padded,
    at least the crop), as a function raising ValueError; None when any size can be cropped."""
    if policy.crop != "padded":
        return None
    return lambda width, height: check_padded_fits(width, height, policy.input_size, policy.crop_padding)


def _mixed(items: list, seed: int, split: str, key) -> list:
    """A fixed shuffled order, so that classes mix across shards and small shuffle buffers suffice."""
    items = sorted(items, key=key)
    random.Random(f"{seed}:{split}").shuffle(items)
    return items
