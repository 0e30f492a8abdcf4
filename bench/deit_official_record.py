"""Runs the official DeiT `main.py` unchanged and records what it trained on: the student's initial
weights and every training batch, in order, so that `bench/deit_swaps.py` can feed them to our
trainer's step (`--arms deit_replay,...`). Run it inside a checkout of DeiT 7e160fe (patched for
the CPU), with timm 0.4.12 first on the path, with main.py's own flags after OUT:

    cd DEIT_CHECKOUT && PYTHONPATH=OLD_TIMM:. python RECORD OUT --model deit_digits_w64d4 --input-size 32 ...

OUT gets `init.safetensors` (the student as `create_model` made it) and `batches.npy` (float16
[steps, batch, 3, H, W], the normalised crops) with `labels.npy` ([steps, batch]). Recording reads
what the loader yields and draws nothing from any random generator, so the run is the one main.py
makes without it (its log, checkpoint and accuracy too).
"""

import os
import sys
from pathlib import Path

# DeiT's modules before this folder's (bench/models.py and bench/data.py would shadow DeiT's)
sys.path[:] = [os.getcwd()] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import main as deit_main  # noqa: E402  the official main.py: run from the checkout
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
batches, labels = [], []
create_model, train_one_epoch = deit_main.create_model, deit_main.train_one_epoch


def recording_create_model(name, *args, **kwargs):
    model = create_model(name, *args, **kwargs)
    if not (out / "init.safetensors").exists():  # the student comes first, the teacher after it
        save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(out / "init.safetensors"))
    return model


class Recorded:
    """The loader, its batches kept as they pass (engine.py's MetricLogger asks for its length)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            batches.append(x.to(torch.float16).numpy())
            labels.append(y.numpy())
            yield x, y


def recording_train_one_epoch(model, criterion, data_loader, *args, **kwargs):
    return train_one_epoch(model, criterion, Recorded(data_loader), *args, **kwargs)


deit_main.create_model = recording_create_model
deit_main.train_one_epoch = recording_train_one_epoch
args = deit_main.get_args_parser().parse_args(sys.argv[2:])
Path(args.output_dir).mkdir(parents=True, exist_ok=True)
deit_main.main(args)
np.save(out / "batches.npy", np.stack(batches))
np.save(out / "labels.npy", np.stack(labels))
print(f"recorded {len(batches)} batches of {batches[0].shape[0]} into {out}")
