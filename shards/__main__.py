"""python -m shards {build,inspect,index,show}"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from distill_core import App, Command, Positional

from .flags import DecoderFlag, RendererFlag


class BuildConfig(BaseModel):
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


def build(cfg: BuildConfig) -> dict:
    from .build import build

    return build(
        cfg.out,
        src=cfg.src,
        demo=cfg.demo,
        shard_size=cfg.shard_size,
        val_fraction=cfg.val_fraction,
        demo_size=cfg.demo_size,
        input_size=cfg.input_size,
        seed=cfg.seed,
        val_src=cfg.val_src,
        progress=cfg.progress,
    )


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
    from .augment import augment, prepare, prepare_encoded, to_pil
    from .decode import decode_image
    from .index import SplitIndex
    from .manifest import Manifest
    from .render import is_jpeg, render_prepared

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
            prep = prepare_encoded if nvjpeg else lambda d, *a: prepare(decode_image(d), *a)
            crop = render_prepared([prep(data, cfg.key, cfg.seed, policy)], policy, cfg.device)[0].cpu()
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
