"""How far cached labels under mixup/cutmix are from the online teacher; prints one JSON line.

python bench/mixup.py --shards runs/demo/shards --checkpoint runs/demo/teacher/model.safetensors

With cached labels the trainer mixes the teacher's labels of the two source crops by the images'
lambda; DeiT's online teacher labels the mixed image itself. On batches mixed exactly as in
training (timm Mixup, mixup 0.8 / cutmix 1.0, switch 0.5), this measures how often the argmax of
the mixed cached target equals the online teacher's argmax on the mixed image, how often the online
label is one of the two source labels, and the mass the cached target puts on the online label.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from pydantic import BaseModel, Field

from distill_core import parse_script_args
from labels.teacher import Teacher, TeacherSettings
from shards import Manifest, ShardStream
from student_trainer.targets import target_distribution
from student_trainer.train import MixupWithLambda, TrainConfig


class BenchMixup(BaseModel):
    shards: str = Field("runs/demo/shards", description="shard directory")
    checkpoint: str = Field("runs/demo/teacher/model.safetensors", description="teacher weights")
    batches: int = Field(20, ge=1, description="mixed batches to compare")
    batch_size: int = Field(64, ge=2, description="batch size")


def main():
    args = parse_script_args(BenchMixup, __doc__)
    torch.manual_seed(0)
    np.random.seed(0)  # timm's Mixup draws lambda from numpy
    m = Manifest.load(args.shards)
    teacher = Teacher(TeacherSettings(checkpoint=args.checkpoint), device="cpu")
    mix = MixupWithLambda(TrainConfig(shards=args.shards, out="-"), len(m.classes))
    stream = ShardStream(args.shards, "train", m.policy(), args.batch_size)
    agree = n = 0
    mass = 0.0
    in_pair = 0
    lams = []
    for i, b in enumerate(stream):
        if i == args.batches:
            break
        x = b["image"]
        own = teacher.logits(x).argmax(1, keepdim=True)  # what the store holds for these crops
        xm, _, lam = mix(x.clone(), b["label"])
        own = own[: len(xm)]
        t = target_distribution(own, None, len(m.classes))
        cached = lam * t + (1 - lam) * t.flip(0)  # exactly what the trainer does with cached labels
        online = teacher.logits(xm)
        agree += (cached.argmax(1) == online.argmax(1)).sum().item()
        n += len(xm)
        # the mass the cached target puts on the online teacher's label (1 = the same target)
        mass += cached.gather(1, online.argmax(1, keepdim=True)).sum().item()
        in_pair += ((online.argmax(1) == own[:, 0]) | (online.argmax(1) == own.flip(0)[:, 0])).sum().item()
        lams.append(lam)
    print(
        json.dumps(
            {
                "batches": len(lams),
                "images": n,
                "mean_lambda": round(sum(lams) / len(lams), 3),
                "argmax_agreement": round(agree / n, 4),
                "online_label_is_one_of_the_pair": round(in_pair / n, 4),
                "mean_cached_mass_on_online_label": round(mass / n, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
