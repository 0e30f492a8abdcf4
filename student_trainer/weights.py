"""Weights a run starts from, and the check that they are the run's architecture.

`--finetune` is DeiT's fine-tuning (at another resolution, on another class count): weights of the
same architecture, with the absolute position embedding resampled by timm's own function to the
new patch grid, and the class and distillation heads left at their fresh initialisation when
their class count differs. Anything else that does not fit (another depth or width, another
patch size, another model) is refused before training, naming what differs.
"""

from __future__ import annotations

import logging

import torch

from distill_core import load_matching, read_weights

log = logging.getLogger(__name__)

HEADS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")


def check_same_model(meta: dict, model: str, model_kwargs: dict, what: str) -> None:
    """ValueError when a checkpoint's recorded model (timm name, kwargs) is not the run's."""
    theirs = meta.get("model")
    if theirs and theirs != model:
        raise ValueError(f"{what} holds a {theirs}, not --model {model}")
    kwargs = meta.get("model_kwargs")
    if theirs and kwargs is not None:
        differ = {
            k: (kwargs.get(k), model_kwargs.get(k))
            for k in set(kwargs) | set(model_kwargs)
            if k != "img_size" and kwargs.get(k) != model_kwargs.get(k)
        }
        if differ:
            raise ValueError(f"{what} holds a {theirs} of other --model-kwargs (theirs, this run's): {differ}")


def finetune_from(model: torch.nn.Module, path: str, model_name: str, model_kwargs: dict) -> dict:
    """Load `path` into `model` for fine-tuning; returns what was adapted (for the log and summary)."""
    state, meta = read_weights(path)
    what = f"--finetune {path}"
    check_same_model(meta, model_name, model_kwargs, what)
    own = model.state_dict()
    reset = [k for k in HEADS if k in state and k in own and state[k].shape != own[k].shape]
    for k in reset:  # another class count: these heads keep their fresh initialisation
        state[k] = own[k]
    resampled = None
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        grid = list(model.patch_embed.grid_size)
        before = tuple(state["pos_embed"].shape)
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=grid, num_prefix_tokens=prefix)
        resampled = [before, tuple(state["pos_embed"].shape)]
    load_matching(model, state, what)
    log.info("fine-tuning from %s: position embedding %s, heads reset %s", path, resampled or "as is", reset or "none")
    return {"finetune": str(path), "pos_embed_resampled": resampled, "heads_reset": reset}
