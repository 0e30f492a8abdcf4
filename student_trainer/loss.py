"""DeiT's distillation loss (none / soft / hard, alpha, tau), with teacher targets from anywhere.

Same semantics as the official `DistillationLoss` (facebookresearch/deit, losses.py):
    loss = (1 - alpha) * base(class_head, labels) + alpha * distill(dist_head, teacher)
    soft: KL(log_softmax(dist / tau) || log_softmax(teacher_logits / tau)) * tau^2 / numel
    hard: cross_entropy(dist, teacher_logits.argmax(1))
The teacher side is a `TeacherTargets`: logits (an online teacher, as in the paper) or a target
distribution (cached labels: one-hot of the cached class, or a top-k distribution, mixed by the
same mixup/cutmix lambda as the images when mixup is on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

DistillationType = Literal["none", "soft", "hard"]
DISTILLATION_TYPES = get_args(DistillationType)


@dataclass
class TeacherTargets:
    logits: torch.Tensor | None = None  # [B, C] online teacher on the (mixed) student input
    dist: torch.Tensor | None = None  # [B, C] cached target distribution (rows sum to 1)
    weight: torch.Tensor | None = None  # [B] 1 where the teacher target is valid (--on-missing skip)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1)


class DistillationLoss(nn.Module):
    def __init__(
        self, base_criterion: nn.Module, distillation_type: str = "hard", alpha: float = 0.5, tau: float = 1.0
    ):
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f"distillation type must be one of {DISTILLATION_TYPES}")
        self.base_criterion = base_criterion
        self.type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, outputs, labels: torch.Tensor, teacher: TeacherTargets | None = None) -> torch.Tensor:
        outputs_kd = None
        if isinstance(outputs, (tuple, list)):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.type == "none":
            return base_loss
        if outputs_kd is None:
            raise ValueError("distillation needs a model with a distillation head (timm deit_*_distilled_*)")
        if teacher is None:
            raise ValueError(f"{self.type} distillation needs teacher targets")
        per_sample = self._distill(outputs_kd, teacher)
        if teacher.weight is not None:
            w = teacher.weight.to(per_sample.dtype)
            distill = (per_sample * w).sum() / w.sum().clamp_min(1.0)
        else:
            distill = per_sample.mean()
        return base_loss * (1 - self.alpha) + distill * self.alpha

    def _distill(self, outputs_kd: torch.Tensor, teacher: TeacherTargets) -> torch.Tensor:
        """Per-sample distillation loss, so that missing teacher targets can be masked."""
        outputs_kd = outputs_kd.float()
        if self.type == "hard":
            if teacher.logits is not None:
                return F.cross_entropy(outputs_kd, teacher.logits.argmax(dim=1), reduction="none")
            return soft_cross_entropy(outputs_kd, teacher.dist)
        # soft
        t = self.tau
        if teacher.logits is not None:
            log_target = F.log_softmax(teacher.logits.float() / t, dim=1)
        else:
            # p^(1/T), renormalized, equals softmax(logits / T) when p = softmax(logits).
            log_p = torch.log(teacher.dist.float().clamp_min(1e-8)) / t
            log_target = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
        kl = F.kl_div(F.log_softmax(outputs_kd / t, dim=1), log_target, reduction="none", log_target=True).sum(1)
        # the official code divides the summed KL by outputs_kd.numel() = B * C
        return kl * (t * t) / outputs_kd.shape[1]
