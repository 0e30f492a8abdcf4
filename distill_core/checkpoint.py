"""Checkpoint I/O: exported weights (safetensors + the metadata that rebuilds the model) and atomic
training checkpoints.

Why not timm's CheckpointSaver: it keeps no scheduler state or step (a resumed run must continue
on the same optimizer step) and pickles its `args`, which would force `weights_only=False` on
resume; our training checkpoint holds plain values only and loads with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter names without DDP's or torch.compile's wrapper prefixes, tensors on the CPU."""
    out = {}
    for k, v in state.items():
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v.detach().cpu().contiguous()
    return out


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save through a temporary file: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def load_training_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by atomic_save: tensors and plain values only (weights_only=True)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def save_weights(state: dict[str, torch.Tensor], path: str | Path, meta: dict) -> Path:
    """Weights as safetensors, `meta` (JSON values) in its header, written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(clean_state_dict(state), str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)
    return path


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict and metadata of a safetensors file or a torch checkpoint (weights_only=True):
    a bare state dict, or one under "model" (with "model_meta") or "state_dict" (timm)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    meta: dict = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        meta = {k: json.loads(v) for k, v in raw.items()}
        state = load_file(str(path))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            meta = obj.get("model_meta", {}) or {}
            obj = obj["model"]
        elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        state = obj
    return clean_state_dict(state), meta


def load_matching(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict) with a message that names the first keys and shapes that differ."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{what} does not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"other shapes {shapes[:4]}"
        )
    module.load_state_dict(state)
