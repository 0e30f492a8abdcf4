"""Checkpoint I/O: exported weights (safetensors + the metadata that rebuilds the model) and atomic
training checkpoints.

Why not timm's CheckpointSaver: it keeps no scheduler state or step (a resumed run must continue
on the same optimizer step) and pickles its `args`, which would force `weights_only=False` on
resume; our training checkpoint holds plain values only and loads with `weights_only=True`.

Both kinds carry a digest of their contents (`content_digest`: every tensor's bytes, every value),
checked when they are read: torch's zip format keeps no checksum, so a flipped byte in a tensor
would otherwise load as a different number. Both are written by `files.atomic_write`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from .files import atomic_write

log = logging.getLogger(__name__)
DIGEST_KEY = "content_sha256"  # in a training checkpoint's dict, and in a safetensors file's metadata

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter names without DDP's or torch.compile's wrapper prefixes, tensors on the CPU."""
    out = {}
    for k, v in state.items():
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v.detach().cpu().contiguous()
    return out


def content_digest(obj) -> str:
    """sha256 of a checkpoint's contents: nested dicts (in their order), lists, tensors (dtype,
    shape, bytes) and plain values."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, list | tuple):
        h.update(b"L%d" % len(obj))
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r}".encode())


def atomic_save(obj: dict, path: str | Path) -> Path:
    """torch.save of `obj` with the digest of its contents, through `atomic_write`: a crash or a
    full disk mid-write leaves the previous file and no temporary (ValueError, one line)."""
    state = {**obj, DIGEST_KEY: content_digest(obj)}
    return atomic_write(path, lambda f: torch.save(state, f))


def load_training_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by atomic_save (tensors and plain values only: weights_only=True), its
    contents checked against their digest. ValueError names a file that cannot be read or whose
    contents changed since it was written."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch reports a damaged zip or pickle by many exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path} cannot be read ({first[:200]}): it is damaged or not a checkpoint") from e
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} is not a training checkpoint (a {type(obj).__name__}, not a dict)")
    digest = obj.pop(DIGEST_KEY, None)
    if digest is None:
        log.warning("checkpoint %s carries no content digest (written before 2026-12-07): not verified", path)
    elif digest != content_digest(obj):
        raise ValueError(
            f"checkpoint {path} is damaged: its contents differ from the digest written with them "
            "(a flipped byte, a partial copy); resume from another copy"
        )
    return obj


def save_weights(state: dict[str, torch.Tensor], path: str | Path, meta: dict) -> Path:
    """Weights as safetensors, `meta` (JSON values) and the digest of the tensors in its header,
    written atomically."""
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = clean_state_dict(state)
    header = {k: json.dumps(v) for k, v in meta.items()} | {DIGEST_KEY: content_digest(dict(sorted(state.items())))}
    return atomic_write(path, lambda f: f.write(save(state, metadata=header)))


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
        digest = raw.pop(DIGEST_KEY, None)
        meta = {k: json.loads(v) for k, v in raw.items()}
        state = load_file(str(path))
        if digest is not None and digest != content_digest(dict(sorted(state.items()))):
            raise ValueError(f"weights {path} are damaged: their contents differ from the digest written with them")
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
