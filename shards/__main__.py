"""python -m shards {build,inspect,index,show}"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from distill_core import App, Command, Positional

from .build import BuildConfig, build
from .flags import DecoderFlag, RendererFlag


class InspectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: Annotated[Path, Positional()] = Field(description="shard directory (with manifest.json)")


class IndexConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: Annotated[Path, Positional()] = Field(description="shard directory (with manifest.json)")
    verify: bool = Field(True, description="check every shard's sha256 against the manifest before indexing it")


class ShowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: Annotated[Path, Positional()] = Field(description="shard directory (with manifest.json)")
    key: Annotated[str, Positional()] = Field(description="image key, e.g. digits/3/00003")
    seed: int = Field(ge=0, description="augmentation seed")
    out: Path = Field(description="PNG file to write")
    policy: dict = Field(
        default_factory=dict, description='JSON of augmentation policy overrides, e.g. {"input_size": 64}'
    )
    renderer: RendererFlag = None
    decoder: DecoderFlag = None
    device: str = Field("cpu", description="where a torch policy renders the crop (cuda for nvjpeg)")


def inspect(cfg: InspectConfig) -> int:
    import json

    from .manifest import Manifest, verify

    m = Manifest.load(cfg.dir)
    problems = verify(cfg.dir, m)
    summary = {
        "dir": str(cfg.dir),
        "source": m.source,
        "val_from": m.val_from,
        "classes": len(m.classes),
        "splits": {
            k: {"shards": len(v), "samples": m.num_samples(k), "bytes": sum(s.bytes for s in v)}
            for k, v in m.splits.items()
        },
        "policy_id": m.policy().policy_id,
        "ok": not problems,
        "problems": problems,
    }
    for p in problems:
        print(f"ERROR {p}", file=sys.stderr)
    print(json.dumps(summary))
    return 0 if not problems else 1


def index(cfg: IndexConfig) -> dict:
    from .index import index_all

    return index_all(cfg.dir, verify=cfg.verify)


def show(cfg: ShowConfig) -> dict:
    from .augment import augment, cut_crop, draw_for_device_decode, to_pil
    from .decode import decode_image
    from .device_decode import is_jpeg
    from .index import SplitIndex
    from .manifest import Manifest
    from .render import render_items

    m = Manifest.load(cfg.dir)
    policy = m.policy(cfg.renderer, cfg.decoder, **cfg.policy)
    for split in m.splits:
        index = SplitIndex.load(cfg.dir, split, m)
        row = index.find(cfg.key)
        if row is None:
            continue
        data = index.member(row).read()
        if policy.renderer == "torch" and cfg.device != "cpu":  # where the trainer would render it
            nvjpeg = policy.decoder == "nvjpeg" and is_jpeg(data)
            prep = draw_for_device_decode if nvjpeg else lambda d, *a: cut_crop(decode_image(d), *a)
            crop = render_items([prep(data, cfg.key, cfg.seed, policy)], policy, cfg.device)[0].cpu()
        else:
            crop = augment(decode_image(data), cfg.key, cfg.seed, policy)
        to_pil(crop, policy).save(cfg.out, format="PNG")
        label = int(index.label[row])
        return {
            "key": cfg.key,
            "seed": cfg.seed,
            "label": label,
            "class": m.classes[label],
            "shard": index.shards[index.shard_of(row)],
            "policy_id": policy.policy_id,
            "renderer": policy.renderer,
            "decoder": policy.decoder,
            "device": cfg.device,
            "out": str(cfg.out),
        }
    raise KeyError(f"key {cfg.key!r} not found in {cfg.dir}")


class ExampleFolderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path = Field(description="folder to write: OUT/train/<class>/*.jpg and OUT/val/<class>/*.jpg")
    train_per_class: int = Field(8, ge=1, description="training images per class")
    val_per_class: int = Field(4, ge=0, description="validation images per class")
    size: int = Field(32, ge=8, description="image side in pixels")


def example_folder(cfg: ExampleFolderConfig) -> dict:
    from .build import write_example_folder

    return write_example_folder(cfg.out, cfg.train_per_class, cfg.val_per_class, cfg.size)


COMMANDS = [
    Command(
        "build",
        help="build shards and manifest.json from an image folder or the demo data set",
        config=BuildConfig,
        run=build,
    ),
    Command(
        "inspect",
        help="summarize shards and verify their checksums (non-zero exit on problems)",
        config=InspectConfig,
        run=inspect,
    ),
    Command(
        "index",
        help="write the member index of shards built without one (start-up that does not read tar headers)",
        config=IndexConfig,
        run=index,
    ),
    Command(
        "example-folder",
        help="write scikit-learn's digits as a JPEG image folder in ImageNet's layout (to try `build --src`)",
        config=ExampleFolderConfig,
        run=example_folder,
    ),
    Command("show", help="write the augmented crop that (KEY, seed) produces as a PNG", config=ShowConfig, run=show),
]


APP = App(
    "python -m shards", "Webdataset shards with seeded augmentation.", COMMANDS, user_errors=(KeyError, ValueError)
)

if __name__ == "__main__":
    sys.exit(APP.main())
