"""What the examples share: their command line and the small DeiT they train on the demo digits."""

import argparse

import timm

from student_trainer import DataConfig


def parse_args(doc: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shard directory (python -m shards build)")
    p.add_argument("--labels", required=True, help="label store (file path, redis://) or teacher service (http://)")
    p.add_argument("--epochs", type=int, default=2, help="epochs (the labels must cover them)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: every epoch)")
    p.add_argument("--workers", type=int, default=2, help="data-loader workers (they fetch the labels)")
    return p.parse_args()


def data_config(args: argparse.Namespace) -> DataConfig:
    """The loader's configuration (the trainer's own data flags) from the example's arguments."""
    if args.labels.startswith(("http://", "https://")):
        source = {"labels": "service", "service_url": args.labels}
    else:
        source = {"labels": "store", "store": args.labels}
    return DataConfig(
        shards=args.shards, epochs=args.epochs, batch_size=args.batch_size, workers=args.workers, **source
    )


def small_deit(num_classes: int, input_size: int, **kwargs):
    """DeiT-Ti's distilled model (class and distillation tokens), shrunk for 32 px digits."""
    return timm.create_model(
        "deit_tiny_distilled_patch16_224", num_classes=num_classes, img_size=input_size,
        patch_size=4, embed_dim=96, depth=4, num_heads=3, **kwargs,
    )  # fmt: skip
