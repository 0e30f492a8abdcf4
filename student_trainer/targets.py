"""The distillation target of a training batch, on the device: from cached labels (`teacher_targets`,
usable in any loop), or from an online teacher (`TeacherTargetBuilder`, the trainer's).

Mixup and cutmix mix two images of a batch, so the teacher's target of a mixed image is the same
mix of the two crops' targets: `lam * t + (1 - lam) * t.flip(0)` with the lambda and the pairing
(a batch with its reverse, timm's) of the images. That is what the paper's online teacher sees
up to the teacher's own non-linearity: `bench/mixup.py` measures how far the two are apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .loss import TeacherTargets


def target_distribution(classes: torch.Tensor, probs: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """[B, k] cached classes (+ probabilities) -> [B, C] target distribution.

    Hard labels become one-hot. With top-k probabilities the rest of the mass is spread evenly
    over the other classes (the store keeps only the top k).
    """
    b, k = classes.shape
    valid = classes.clamp_min(0)
    if probs is None:
        return torch.zeros(b, num_classes, device=classes.device).scatter_(1, valid[:, :1], 1.0)
    p = probs.float().clamp_min(0)
    rest = (1.0 - p.sum(1, keepdim=True)).clamp_min(0) / max(num_classes - k, 1)
    dist = rest.expand(b, num_classes).clone()
    return dist.scatter_(1, valid, p)


def mix(targets: torch.Tensor, lam: float) -> torch.Tensor:
    """Targets of a batch mixed as timm's Mixup/CutMix (batch mode) mixed its images."""
    return lam * targets + (1 - lam) * targets.flip(0)


def teacher_targets(
    batch: dict,
    num_classes: int,
    lam: float | None = None,
    device: torch.device | str | None = None,
    n: int | None = None,
) -> TeacherTargets:
    """DeiT's distillation target from a `labeled_loader` batch, for `DistillationLoss`: one-hot of
    each crop's teacher label (or its top-k distribution), rows without a label weighted 0 (they
    carry no distillation loss), mixed by `lam` as the images were (None: not mixed). `n`: the
    first n rows only (timm's mixup drops an odd batch's last sample)."""
    n = len(batch["present"]) if n is None else n
    device = device if device is not None else "cpu"
    probs = batch.get("teacher_probs")
    dist = target_distribution(
        batch["teacher_classes"][:n].to(device, non_blocking=True),
        None if probs is None else probs[:n].to(device, non_blocking=True),
        num_classes,
    )
    weight = None
    if batch["teacher_missing"]:
        weight = batch["present"][:n].float().to(device, non_blocking=True)
    if lam is not None:
        dist = mix(dist, lam)
        if weight is not None:
            weight = weight * weight.flip(0)
    return TeacherTargets(dist=dist, weight=weight)


class MixupWithLambda:
    """timm's Mixup/CutMix (batch mode) that also returns lambda, so that teacher targets can be
    mixed exactly like the images (`teacher_targets(batch, C, lam)`). timm's public
    `Mixup.__call__` returns the mixed true targets but not lambda, hence its `_mix_batch`."""

    def __init__(
        self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
        switch_prob: float = 0.5, label_smoothing: float = 0.1,
    ):  # fmt: skip
        from timm.data import Mixup

        self.m = Mixup(
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
            mode="batch", label_smoothing=label_smoothing, num_classes=num_classes,
        )  # fmt: skip

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(mixed images, mixed smoothed true targets, lambda); an odd batch loses its last sample
        (timm mixes a batch with its reverse)."""
        from timm.data.mixup import mixup_target

        if len(x) % 2:
            x, y = x[:-1], y[:-1]
        lam = self.m._mix_batch(x)  # in place, same draw as timm's Mixup.__call__
        return x, mixup_target(y, self.m.num_classes, lam, self.m.label_smoothing), float(lam)


class TeacherTargetBuilder:
    """The trainer's target: none, the online teacher's logits on the (mixed) images (DeiT's
    baseline), or cached labels (`teacher_targets`), whose missing rows `--on-missing online` has
    the teacher fill in and `skip` masks. Whether any label is missing is a host-side count from
    the loader, so the step never waits on the device."""

    def __init__(self, labels: str, on_missing: str, distillation_type: str, num_classes: int, teacher=None):
        self.labels = labels
        self.on_missing = on_missing
        self.soft = distillation_type == "soft"
        self.num_classes = num_classes
        self.teacher = teacher
        self.labels_online = 0  # missing labels the online teacher filled in

    def __call__(self, batch: dict, x: torch.Tensor, lam: float | None) -> TeacherTargets | None:
        """`x`: the batch's (mixed) images on the device, `lam`: the mixup lambda (None: no mixing)."""
        if self.labels == "none":
            return None
        if self.labels == "online":  # DeiT's baseline: the teacher sees the mixed image
            return TeacherTargets(logits=self.teacher.logits(x))
        n, device = len(x), x.device  # mixup may have dropped an odd last sample
        if not (batch["teacher_missing"] and self.on_missing == "online"):
            return teacher_targets(batch, self.num_classes, lam, device, n)
        dist = teacher_targets(batch, self.num_classes, None, device, n).dist
        miss = (~batch["present"][:n]).nonzero().flatten()  # a CPU tensor: no wait on the device
        if len(miss):
            miss = miss.to(device, non_blocking=True)
            logits = self.teacher.logits(x[miss])  # the teacher sees the mixed image, as online
            dist[miss] = logits.softmax(1) if self.soft else F.one_hot(logits.argmax(1), self.num_classes).float()
            self.labels_online += len(miss)
        return TeacherTargets(dist=mix(dist, lam) if lam is not None else dist)
