"""The trainer's configuration: DeiT's recipe as defaults, every flag of `train`, and every check of
their combination (a run that cannot work is refused before any process starts training).

`DataConfig` is the data side of a run (shards, augmentation, teacher labels, schedule, loader):
what `labeled_loader` takes, in `train` or in a loop of your own. `TrainConfig` is a DataConfig
with the model, DeiT's loss and recipe, and execution: one model, so `train`'s flags and the
loader's are the same flags."""

from __future__ import annotations

import difflib
import functools
import os
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from distill_core import Nested, NotAFlag, read_secret
from distill_core.secrets import SecretURL
from labels.teacher import TeacherSettings
from shards.flags import DecoderFlag, RendererFlag, RepeatModeFlag

from .loss import DistillationType

LabelSource = Literal["none", "store", "service", "online"]
OnMissing = Literal["error", "service", "online", "skip"]  # what a label the store lacks does
ON_MISSING = get_args(OnMissing)


class DataConfig(BaseModel):
    """The data side of a run; see the module docstring."""

    model_config = ConfigDict(extra="forbid")

    shards: str = Field(description="shard directory (with manifest.json)")
    policy: dict = Field(
        default_factory=dict, description="JSON augmentation policy overrides (must match the labels' policy)"
    )
    input_size: int | None = Field(
        None, ge=8, description="crop side in pixels (default: the shards' policy hint; DeiT: 224)"
    )
    renderer: RendererFlag = None
    decoder: DecoderFlag = None
    # teacher labels
    labels: LabelSource = Field(
        "none", description="teacher labels: none | store | service | online (DeiT's in-process teacher)"
    )
    store: SecretURL | None = Field(
        None,
        description="label store URL for --labels store (file path or redis://; with a password, env:NAME or @FILE)",
    )
    namespace: str | None = Field(
        None,
        description="label namespace id (prefix); default: the store's only one, else its only one of the run's policy",
    )
    store_retry_for: float = Field(
        60.0, ge=0, description="seconds an unreachable store is retried before the run stops (resumable)"
    )
    service_url: str | None = Field(None, description="teacher service URL (--labels service, or --on-missing service)")
    service_token: Annotated[str | None, NotAFlag()] = Field(
        None, exclude=True, description="bearer token of the teacher service (default: DISTILL_TOKEN)"
    )
    service_token_file: str | None = Field(
        None, description="file holding the teacher service's bearer token (default: $DISTILL_TOKEN)"
    )
    on_missing: OnMissing = Field(
        "error", description="a cached label is missing: error | service | online | skip (counted in the summary)"
    )
    # the run's schedule and loader
    epochs: int = Field(300, ge=1, description="training epochs")
    batch_size: int = Field(128, ge=1, description="batch size per rank")
    repeated_aug: int = Field(3, ge=1, description="repeated augmentation: R crops of each image it selects (DeiT: 3)")
    repeat_mode: RepeatModeFlag = "deit"
    workers: int = Field(2, ge=0, description="data-loader worker processes per rank")
    seed: int = Field(0, ge=0, description="seed of weights, data order and mixup")

    @model_validator(mode="after")
    def _label_source(self):
        if self.labels == "store" and not self.store:
            raise ValueError("--labels store needs --store URL")
        if self.labels == "service" and not self.service_url:
            raise ValueError("--labels service needs --service-url")
        if self.on_missing == "service" and not self.service_url:
            raise ValueError("--on-missing service needs --service-url")
        if self.service_token is None:  # never a flag: `ps` shows every process's arguments
            if self.service_token_file:
                self.service_token = read_secret(self.service_token_file, "--service-token-file")
            else:
                self.service_token = os.environ.get("DISTILL_TOKEN") or None
        return self

    def augment_policy(self, manifest):
        """The run's augmentation policy: the shards' hint, then --renderer, --decoder, --policy
        and --input-size."""
        overrides = {**self.policy, **({"input_size": self.input_size} if self.input_size else {})}
        return manifest.policy(self.renderer, self.decoder, **overrides)

    @property
    def labels_url(self) -> str | None:
        """Where the loader fetches teacher labels: the store, the service, or nowhere (none, online)."""
        return {"store": self.store, "service": self.service_url}.get(self.labels)


class TrainConfig(DataConfig):
    model_config = ConfigDict(extra="forbid")

    out: str | None = Field(
        None, description="run directory: last.pt (checkpoint), metrics.jsonl, model.safetensors (not with --eval)"
    )
    model: str = Field(
        "deit_tiny_distilled_patch16_224",
        description="timm model; distillation needs a deit_*_distilled_* model",
    )
    model_kwargs: dict = Field(
        default_factory=dict,
        description='JSON model kwargs, e.g. {"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}',
    )
    teacher: Annotated[TeacherSettings, Nested("teacher-", title="online teacher")] = Field(
        default_factory=TeacherSettings, description="the online teacher (--labels online, --on-missing online)"
    )
    # what the run starts from, or does instead of training
    resume: str | None = Field(None, description="checkpoint to resume from, or 'auto' for OUT/last.pt if present")
    finetune: str | None = Field(
        None,
        description="start from these weights (last.pt or .safetensors of the same architecture): the position "
        "embedding is resampled to --input-size, heads of another class count are reset (not when resuming)",
    )
    eval: bool = Field(False, description="evaluate the --resume checkpoint on the val split, no training")
    # DeiT's loss
    distillation_type: DistillationType | None = Field(
        None, description="none | soft | hard (default: hard with teacher labels, none without)"
    )
    distillation_alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation term (DeiT: 0.5)")
    distillation_tau: float = Field(1.0, gt=0, description="soft distillation temperature (DeiT: 1.0)")
    # DeiT's recipe. The optimizer and schedule are timm's factories, their flags named as in timm's
    # train.py and DeiT's main.py; learning rates are for a global batch of 512, scaled linearly
    opt: str = Field("adamw", description="optimizer: any name of timm.optim.list_optimizers() (DeiT: adamw)")
    opt_eps: float | None = Field(1e-8, gt=0, description="optimizer epsilon, where it has one (DeiT: 1e-8)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (DeiT: 0.9)")
    weight_decay: float = Field(0.05, ge=0, description="weight decay, none on biases, norms and tokens (DeiT: 0.05)")
    lr: float = Field(5e-4, gt=0, description="learning rate for a global batch of 512, scaled linearly (DeiT: 5e-4)")
    sched: Literal["cosine", "tanh", "step", "poly"] = Field(
        "cosine", description="learning-rate schedule, per optimizer step: cosine | tanh | step | poly (DeiT: cosine)"
    )
    min_lr: float = Field(1e-5, ge=0, description="final learning rate of the schedule (per 512 with --scale-min-lr)")
    warmup_lr: float = Field(1e-6, ge=0, description="learning rate at the start of warm-up")
    warmup_epochs: int = Field(5, ge=0, description="epochs of linear warm-up")
    cooldown_epochs: int = Field(
        0,
        ge=0,
        description="the last N of --epochs at --min-lr after the schedule ends (timm's train.py adds them to "
        "--epochs; here --epochs counts every epoch trained, so precompute covers them). DeiT sets 10 and "
        "never runs them",
    )
    sched_on_epochs: bool = Field(
        True,
        description="step the lr once an epoch, as DeiT's main.py does (epoch e at the schedule's value for "
        "e - 1; warm-up epoch 0 at --warmup-lr); --no-sched-on-epochs: every optimizer step",
    )
    scale_min_lr: bool = Field(
        False, description="scale --min-lr by batch / 512 like --lr (DeiT's main.py scales --lr only)"
    )
    decay_epochs: float = Field(30, gt=0, description="--sched step: epochs between decays")
    decay_rate: float = Field(0.1, gt=0, le=1, description="--sched step: factor of each decay")
    smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the class-head target")
    mixup: float = Field(0.8, ge=0, description="mixup alpha (0: off)")
    cutmix: float = Field(1.0, ge=0, description="cutmix alpha (0: off)")
    mixup_prob: float = Field(1.0, ge=0, le=1, description="probability of mixing a batch")
    mixup_switch_prob: float = Field(0.5, ge=0, le=1, description="probability of cutmix instead of mixup")
    drop_path: float = Field(0.1, ge=0, lt=1, description="stochastic depth rate")
    clip_grad: float | None = Field(None, gt=0, description="gradient norm clipping (default off)")
    model_ema: bool = Field(False, description="keep an exponential moving average of the weights (timm's ModelEmaV3)")
    model_ema_decay: float = Field(0.99996, gt=0, lt=1, description="decay of --model-ema per step (DeiT: 0.99996)")
    # execution
    amp: Literal["auto", "bf16", "fp16", "none"] = Field("auto", description="auto (bf16 on CUDA, none on CPU)")
    compile: bool = Field(False, description="torch.compile the student (and the online teacher)")
    threads: int = Field(0, ge=0, description="torch CPU threads per rank (0: the cores of the CPU affinity / ranks)")
    eval_every: int = Field(1, ge=0, description="evaluate every N epochs (0: never)")
    log_every: int = Field(
        50, ge=1, description="read and check the loss every N steps (the step's only wait on the device)"
    )
    checkpoint_every: int = Field(1, ge=0, description="checkpoint every N epochs (0: never)")
    max_steps: int = Field(0, ge=0, description="stop after N optimizer steps (benchmarks; 0: full run)")
    export: bool = Field(True, description="write OUT/model.safetensors at the end (loadable as a teacher)")
    tensorboard: bool = Field(
        False, description="also write the metrics as TensorBoard event files in OUT/tensorboard (rank 0)"
    )
    progress: bool = Field(True, description="progress bar on rank 0")

    @model_validator(mode="after")
    def _consistent(self):
        if self.distillation_type is None:
            self.distillation_type = "none" if self.labels == "none" else "hard"
        if (self.distillation_type == "none") != (self.labels == "none"):
            raise ValueError(f"--distillation-type {self.distillation_type} does not fit --labels {self.labels}")
        if self.eval:
            if not self.resume:
                raise ValueError("--eval needs a checkpoint: --resume OUT/last.pt")
            if self.resume == "auto" and not self.out:
                raise ValueError("--eval --resume auto needs --out (its last.pt)")
        elif not self.out:
            raise ValueError("--out DIR is required (the run's checkpoint, metrics and weights)")
        if self.cooldown_epochs >= self.epochs:
            raise ValueError(f"--cooldown-epochs {self.cooldown_epochs} leaves no schedule in --epochs {self.epochs}")
        self.opt = self.opt.lower()
        known = known_optimizers()
        if self.opt.split("_")[-1] not in known:  # timm's names, with its "lookahead_" prefix
            close = difflib.get_close_matches(self.opt, known, n=3)
            raise ValueError(
                f"--opt {self.opt}: timm has no such optimizer"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + "; timm.optim.list_optimizers() names them all"
            )
        if self.needs_teacher:
            self.teacher.check_source()
        return self

    @property
    def needs_teacher(self) -> bool:
        """An in-process teacher: DeiT's online baseline, or the fallback for missing labels."""
        return self.labels == "online" or (self.labels in ("store", "service") and self.on_missing == "online")


@functools.cache
def known_optimizers() -> tuple[str, ...]:
    from timm.optim import list_optimizers

    return tuple(list_optimizers())
