"""python -m student_trainer {train,demo}  (train also under torchrun)"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from shards.cli import dispatch

from .train import TrainConfig

HELP = {
    "shards": "shard directory (with manifest.json)",
    "out": "run directory: last.pt (checkpoint), metrics.jsonl, model.safetensors",
    "model": "timm model; distillation needs a deit_*_distilled_* (default deit_tiny_distilled_patch16_224)",
    "model_kwargs": 'JSON model kwargs, e.g. \'{"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}\'',
    "policy": "JSON augmentation policy overrides (must match the labels' policy)",
    "labels": "teacher labels: none | store | service | online (DeiT's in-process teacher)",
    "store": "label store URL for --labels store (file path or redis://)",
    "namespace": "label namespace id (prefix) when the store holds several",
    "service_url": "teacher service URL (--labels service, or --on-missing service)",
    "service_token": "bearer token of the teacher service",
    "on_missing": "a cached label is missing: error | service | online | skip (counted in the summary)",
    "teacher_model": "online teacher: timm model (default: from its checkpoint)",
    "teacher_checkpoint": "online teacher weights",
    "teacher_random_init": "online teacher with random weights (speed benchmarks only)",
    "distillation_type": "none | soft | hard (default: hard with labels, none without)",
    "distillation_alpha": "weight of the distillation term (DeiT: 0.5)",
    "distillation_tau": "soft distillation temperature (DeiT: 1.0)",
    "batch_size": "batch size per rank",
    "lr": "learning rate for a global batch of 512, scaled linearly (DeiT: 5e-4)",
    "repeated_aug": "repeated augmentation: each image R times per epoch with seeds e*R+r (DeiT: 3)",
    "clip_grad": "gradient norm clipping (default off)",
    "amp": "auto (bf16 on CUDA) | bf16 | fp16 | none",
    "workers": "data-loader worker processes per rank",
    "threads": "torch CPU threads per rank (0: cores / ranks)",
    "eval_every": "evaluate every N epochs (0: never)",
    "checkpoint_every": "checkpoint every N epochs (0: never)",
    "max_steps": "stop after N optimizer steps (benchmarks; 0: full run)",
    "resume": "checkpoint to resume from, or 'auto' for OUT/last.pt if present",
    "export": "write OUT/model.safetensors at the end (loadable as a teacher)",
    "progress": "progress bar on rank 0",
}


def add_config_args(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        h = HELP.get(f.name, "") + (
            f" (default: {default})" if default not in (None, "") and f.name not in HELP else ""
        )
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if typ is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=h)
        elif typ is dict:
            p.add_argument(flag, dest=f.name, type=json.loads, default={}, help=h)
        else:
            base = {int: int, float: float, int | None: int, float | None: float}.get(typ, str)
            p.add_argument(flag, dest=f.name, type=base, default=default, required=required, help=h)


def cmd_train(args) -> int:
    from .train import train

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    summary = train(cfg)
    if summary:
        print(json.dumps(summary), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m student_trainer", description="DeiT students from cached teacher labels."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser(
        "train",
        help="train a student (or the demo teacher); also under torchrun",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_args(t)
    t.set_defaults(fn=cmd_train)
    from .demo import add_parser as add_demo

    add_demo(sub)
    return p


def main(argv=None) -> int:
    return dispatch(build_parser(), argv, (ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
