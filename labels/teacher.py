"""The teacher runtime: one place where the teacher runs, for precompute, the service and the trainer.

A timm model by name (default `regnety_160`, DeiT's teacher) with weights from a local checkpoint
(safetensors, or a state dict loaded with weights_only=True), timm's hub (`pretrained`), or random
init (speed benchmarks only; recorded in the teacher id). The teacher id is the architecture (with
its hub tag for pretrained weights) plus a digest of the weights, so labels of different weights
never share a namespace.

Pretrained weights of an architecture DeiT distilled from are DeiT's own: `regnety_160` loads
timm's `regnety_160.deit_in1k` (the RegNetY-16GF DeiT trained, 82.9% top-1), not timm's default
tag for the name (`regnety_160.sw_in12k_ft_in1k`, another training). A tag given in the name
(`regnety_160.sw_in12k_ft_in1k`) is loaded as given. Without internet, `--pretrained-file` points
timm at a local copy of the hub file (timm's `pretrained_cfg_overlay`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from distill_core import autocast, load_matching, read_weights

from .namespace import Namespace, RecordFormat, classes_digest

log = logging.getLogger(__name__)

DEFAULT_TEACHER = "regnety_160"
# the weights DeiT distilled from, by architecture: what --pretrained loads for that name
DEIT_TEACHER_TAGS = {"regnety_160": "regnety_160.deit_in1k"}


def pretrained_name(model: str) -> str:
    """The timm name (architecture.tag) that --pretrained loads for `model`."""
    return DEIT_TEACHER_TAGS.get(model, model)


class TeacherSettings(BaseModel):
    """Which teacher: nested into the precompute, service and trainer configurations (flags
    `--checkpoint` ... there, `--teacher-checkpoint` ... in the trainer)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description=f"timm model name (default: the checkpoint's metadata, else {DEFAULT_TEACHER})"
    )
    checkpoint: str | None = Field(
        None, description="weights: .safetensors or a torch state dict (loaded with weights_only=True)"
    )
    pretrained: bool = Field(
        False,
        description="timm hub weights (needs internet or --pretrained-file); regnety_160 loads DeiT's teacher, "
        "regnety_160.deit_in1k",
    )
    pretrained_file: str | None = Field(
        None, description="local copy of the --pretrained hub weights (.safetensors or .pth), for machines offline"
    )
    random_init: bool = Field(False, description="random weights: speed benchmarks only (recorded in the namespace)")
    num_classes: int | None = Field(
        None, ge=1, description="classifier size for --pretrained/--random-init (default: the model's or checkpoint's)"
    )
    amp: Literal["auto", "bf16", "fp16", "none"] = Field("auto", description="autocast on CUDA (auto: bf16)")
    channels_last: bool = Field(True, description="channels-last memory format (faster convnets on GPUs)")
    compile: bool = Field(
        False,
        description="torch.compile the teacher, once per process (the label engine then pads every batch to "
        "its --max-batch-size, so that the compiled model sees one shape)",
    )

    def check_source(self) -> None:
        if sum([bool(self.checkpoint), self.pretrained, self.random_init]) != 1:
            raise ValueError(
                "choose exactly one teacher weight source: a checkpoint, pretrained (hub) or random-init weights"
            )
        if self.pretrained_file and not self.pretrained:
            raise ValueError("--pretrained-file is a local copy of the --pretrained weights: give --pretrained too")


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: format-independent."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def pick_device(name: str) -> torch.device:
    """`auto` (CUDA if there is one, else the CPU), `cpu`, `cuda` or `cuda:N`: a device a teacher
    can run on here; ValueError for anything else (`meta` holds no data, `cpu:7` names nothing,
    a GPU that is not there), before any work is accepted."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r}: {e}") from None
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise ValueError(f"device {name!r}: there is one CPU device (its cores are the workers' and threads')")
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"device {name!r}: a teacher runs on cpu or cuda[:N], not {device.type}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"device {name!r}: this machine has no CUDA device")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= count:
        raise ValueError(f"device {name!r}: this machine has CUDA devices 0..{count - 1}")
    return torch.device("cuda", index)


class Teacher:
    """Eval-mode, batched, channels-last inference; `predict` returns top-k classes and probabilities."""

    def __init__(self, cfg: TeacherSettings, device: str = "auto"):
        import timm

        cfg.check_source()
        self.cfg = cfg
        meta: dict = {}
        state = None
        if cfg.checkpoint:
            state, meta = read_weights(cfg.checkpoint)
        self.model_name = cfg.model or meta.get("model") or DEFAULT_TEACHER
        if cfg.pretrained:
            self.model_name = pretrained_name(self.model_name)
        kwargs = dict(meta.get("model_kwargs", {}))
        num_classes = cfg.num_classes or meta.get("num_classes")
        if num_classes:
            kwargs["num_classes"] = num_classes
        self.classes: list[str] | None = meta.get("classes")
        if cfg.random_init:
            torch.manual_seed(0)  # the same random teacher in every process
        if cfg.pretrained_file:  # timm loads it in place of the hub's file, as the hub's would be
            kwargs["pretrained_cfg_overlay"] = {"file": cfg.pretrained_file}
        self.model = timm.create_model(self.model_name, pretrained=cfg.pretrained, **kwargs)
        tag = (getattr(self.model, "pretrained_cfg", None) or {}).get("tag")
        if cfg.pretrained and tag and "." not in self.model_name:  # the hub weights' tag, in the teacher id
            self.model_name = f"{self.model_name}.{tag}"
        if state is not None:
            load_matching(self.model, state, f"checkpoint {cfg.checkpoint} ({self.model_name})")
        self.model.eval()
        self.num_classes = self.model.num_classes
        if self.classes is None:
            self.classes = [str(i) for i in range(self.num_classes)]
        digest = weights_digest(self.model.state_dict())
        origin = "random-init" if cfg.random_init else "w"
        self.teacher_id = f"{self.model_name}@{origin}:{digest[:16]}"
        self.device = pick_device(device)
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._copy_stream = None  # created on first use: CUDA streams do not survive a fork
        self.compiled = False
        if cfg.compile:
            self.compile()
        log.info("teacher %s on %s (%d classes)", self.teacher_id, self.device, self.num_classes)

    def compile(self) -> Teacher:
        """torch.compile the forward, once (the weights, and so the teacher id, are unchanged)."""
        if not self.compiled:
            self.model = torch.compile(self.model)
            self.compiled = True
        return self

    def namespace(self, policy_id: str, fmt: RecordFormat, classes: list[str] | None = None) -> Namespace:
        cls = classes or self.classes
        if len(cls) != self.num_classes:
            raise ValueError(f"teacher has {self.num_classes} classes but the data set has {len(cls)}")
        return Namespace(self.teacher_id, policy_id, fmt, self.num_classes, classes_digest(cls))

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.cfg.amp):
            return self.model(x).float()

    @torch.inference_mode()
    def launch(self, x: torch.Tensor, topk: int = 1) -> PendingPrediction:
        """Start labeling a batch without waiting for it; `.result()` waits.

        On CUDA the host->device copy runs on a side stream (from page-locked memory it overlaps
        the forward of the batch before), the forward and top-k on the current stream, and the
        top-k comes back by an asynchronous copy; the caller can launch the next batch before
        collecting this one. On the CPU it runs to completion here."""
        if self.device.type != "cuda":
            return PendingPrediction(*self._topk(x, topk), None)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            xd = x.to(self.device, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(self._copy_stream)
        compute.wait_event(copied)
        xd.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        c, p = self._topk(xd, topk)
        c, p = c.to("cpu", non_blocking=True), p.to("cpu", non_blocking=True)  # into pinned memory
        done = torch.cuda.Event()
        done.record(compute)
        return PendingPrediction(c, p, done)

    def _topk(self, x: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        p, c = self.logits(x).softmax(dim=-1).topk(topk, dim=-1)
        return c, p

    def predict(self, x: torch.Tensor, topk: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(classes [B, k] int64, probabilities [B, k] float32), on the CPU."""
        return self.launch(x, topk).result()


@dataclass
class PendingPrediction:
    classes: torch.Tensor
    probs: torch.Tensor
    done: torch.cuda.Event | None

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.done is not None:
            self.done.synchronize()
        return self.classes, self.probs
