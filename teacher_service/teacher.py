"""The teacher runtime: one place where the teacher runs, for precompute, the service and the trainer.

A timm model by name (default `regnety_160`, DeiT's teacher) with weights from a local checkpoint
(safetensors, or a state dict loaded with weights_only=True), timm's hub (`pretrained`), or random
init (speed benchmarks only; recorded in the teacher id). The teacher id is the architecture plus
a digest of the weights, so labels of different weights never share a namespace.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .namespace import Namespace, RecordFormat, classes_digest

log = logging.getLogger(__name__)

DEFAULT_TEACHER = "regnety_160"


@dataclass
class TeacherConfig:
    model: str | None = None  # None: from the checkpoint's metadata, else DEFAULT_TEACHER
    checkpoint: str | None = None
    pretrained: bool = False
    random_init: bool = False
    num_classes: int | None = None
    model_kwargs: dict = field(default_factory=dict)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | fp16 | none
    channels_last: bool = True
    seed: int = 0  # random-init seed

    def __post_init__(self):
        sources = sum([bool(self.checkpoint), self.pretrained, self.random_init])
        if sources != 1:
            raise ValueError(
                "choose exactly one teacher weight source: --checkpoint PATH, --pretrained or --random-init"
            )


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict and metadata (model name, kwargs, classes) of a safetensors or torch checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"teacher checkpoint {path} not found")
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
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    return state, meta


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: format-independent."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


class Teacher:
    """Eval-mode, batched, channels-last inference; `predict` returns top-k classes and probabilities."""

    def __init__(self, cfg: TeacherConfig):
        import timm

        self.cfg = cfg
        meta: dict = {}
        state = None
        if cfg.checkpoint:
            state, meta = read_checkpoint(cfg.checkpoint)
        self.model_name = cfg.model or meta.get("model") or DEFAULT_TEACHER
        kwargs = {**meta.get("model_kwargs", {}), **cfg.model_kwargs}
        num_classes = cfg.num_classes or meta.get("num_classes")
        if num_classes:
            kwargs["num_classes"] = num_classes
        self.classes: list[str] | None = meta.get("classes")
        if cfg.random_init:
            torch.manual_seed(cfg.seed)
        self.model = timm.create_model(self.model_name, pretrained=cfg.pretrained, **kwargs)
        if state is not None:
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"checkpoint {cfg.checkpoint} does not fit {self.model_name}: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
        self.model.eval()
        self.num_classes = self.model.num_classes
        if self.classes is None:
            self.classes = [str(i) for i in range(self.num_classes)]
        digest = weights_digest(self.model.state_dict())
        origin = "random-init" if cfg.random_init else "w"
        self.teacher_id = f"{self.model_name}@{origin}:{digest[:16]}"
        self.device = pick_device(cfg.device)
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._copy_stream = None  # created on first use: CUDA streams do not survive a fork
        log.info("teacher %s on %s (%d classes)", self.teacher_id, self.device, self.num_classes)

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
        with autocast_for(self.device, self.cfg.amp):
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


def add_teacher_args(p, prefix: str = "") -> None:
    """Teacher flags shared by precompute, serve and the trainer's online baseline."""
    g = p.add_argument_group("teacher")
    g.add_argument(
        f"--{prefix}model",
        dest=f"{prefix.replace('-', '_')}model",
        default=None,
        help=f"timm model name (default: from the checkpoint's metadata, else {DEFAULT_TEACHER})",
    )
    w = g.add_mutually_exclusive_group()
    w.add_argument(
        f"--{prefix}checkpoint",
        dest=f"{prefix.replace('-', '_')}checkpoint",
        help="weights: .safetensors or a torch state dict (loaded with weights_only=True)",
    )
    w.add_argument(
        f"--{prefix}pretrained",
        dest=f"{prefix.replace('-', '_')}pretrained",
        action="store_true",
        help="timm hub weights (needs internet)",
    )
    w.add_argument(
        f"--{prefix}random-init",
        dest=f"{prefix.replace('-', '_')}random_init",
        action="store_true",
        help="random weights, for speed benchmarks only (recorded in the namespace)",
    )
    g.add_argument(
        f"--{prefix}num-classes",
        dest=f"{prefix.replace('-', '_')}num_classes",
        type=int,
        default=None,
        help="classifier size for --pretrained/--random-init (default: the model's or checkpoint's)",
    )
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    g.add_argument(
        "--amp", default="auto", choices=["auto", "bf16", "fp16", "none"], help="autocast on CUDA (default bf16)"
    )


def teacher_config_from_args(args, prefix: str = "", **extra) -> TeacherConfig:
    a = prefix.replace("-", "_")
    return TeacherConfig(
        model=getattr(args, f"{a}model"),
        checkpoint=getattr(args, f"{a}checkpoint"),
        pretrained=getattr(args, f"{a}pretrained"),
        random_init=getattr(args, f"{a}random_init"),
        num_classes=getattr(args, f"{a}num_classes"),
        device=args.device,
        amp=args.amp,
        **extra,
    )


def save_model(
    model: torch.nn.Module, path: str | Path, model_name: str, model_kwargs: dict, classes: list[str]
) -> Path:
    """Weights as safetensors with what a Teacher needs to rebuild the model in its metadata."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k.removeprefix("module."): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"model": model_name, "model_kwargs": model_kwargs, "num_classes": len(classes), "classes": classes}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)
    return path
