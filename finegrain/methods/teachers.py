"""Teachers: what a supcon batch's photos should be called, from a model other than the one training.

- `EmaTeacher`: a slowly moving average of the model itself (Mean Teacher, Tarvainen & Valpola 2017)
  names unlabelled photos; only confident names are kept (`--unlabeled pseudo`).
- `ArtifactTeacher`: a trained supcon artifact's backbone and classifier give soft labels for every
  photo (self-training by distillation, Su et al. CVPR 2021; `--teacher`).

A teacher is kept in eval mode and its weights get no gradient. The method calls
`teacher.targets(views, labels) -> (labels (V*B,), soft_logits (V*B, C) or None, metrics)`, with
views a list of V tensors (B, 3, S, S) and labels (B,) int, -1 for unlabelled photos.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finegrain.models.momentum import ema_update, momentum_copy


def confident_labels(probs: Tensor, threshold: float) -> Tensor:
    """(U, C) class probabilities -> (U,) int64: the most probable class, or -1 where its probability < threshold."""
    top, label = probs.max(dim=1)
    return torch.where(top >= threshold, label, torch.full_like(label, -1))


class _Frozen(nn.Module):
    """Always in eval mode; no parameter needs a gradient."""

    def train(self, mode: bool = True):
        return super().train(False)


class EmaTeacher(_Frozen):
    """Pseudo-labels for the unlabelled photos of a batch from a moving average of backbone + classifier.

    A photo's class probabilities are averaged over its V views; photos whose top probability is
    below `threshold` (species outside the label list, unclear photos) keep label -1 and take no
    part in the loss. After each optimizer step `update` moves the average with momentum
    min(momentum, 1 - 1 / (step + 1)), Mean Teacher's ramp: early on it follows the model closely.

    Args:
        backbone: the model's backbone (copied).
        classifier: the model's classifier head, (B, D) -> (B, C) (copied).
        momentum: the final momentum per optimizer step, in [0, 1].
        threshold: the confidence a pseudo-label needs, in (0, 1).
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module, *, momentum: float, threshold: float):
        super().__init__()
        self.backbone, self.classifier = momentum_copy(backbone), momentum_copy(classifier)
        self.momentum, self.threshold = momentum, threshold

    @torch.no_grad()
    def targets(self, views, labels: Tensor):
        unlabelled = labels < 0
        if not bool(unlabelled.any()):
            return labels.repeat(len(views)), None, {}
        probs = torch.stack([self.classifier(self.backbone(v[unlabelled])).float().softmax(1) for v in views]).mean(0)
        pseudo = confident_labels(probs, self.threshold)
        named = labels.clone()
        named[unlabelled] = pseudo
        return named.repeat(len(views)), None, {"pseudo_labelled": (pseudo >= 0).float().mean()}

    @torch.no_grad()
    def update(self, backbone: nn.Module, classifier: nn.Module, step: int) -> None:
        momentum = min(self.momentum, 1.0 - 1.0 / (step + 1))
        ema_update(self.backbone, backbone, momentum)
        ema_update(self.classifier, classifier, momentum)


class ArtifactTeacher(_Frozen):
    """Soft labels for every view: a trained backbone's L2-normalised features through a linear classifier.

    The views arrive normalised for the student; `scale` and `shift` turn them into the teacher's
    normalisation (x_teacher = x * std_s / std_t + (mean_s - mean_t) / std_t), so student and
    teacher backbones may differ.

    Args:
        backbone: the teacher's backbone, (B, 3, S, S) -> (B, D).
        weight: (C, D) classifier weights; bias: (C,).
        student_mean, student_std, teacher_mean, teacher_std: per-channel (3,) input normalisations.
    """

    def __init__(self, backbone: nn.Module, weight: Tensor, bias: Tensor, *, student_mean, student_std,
                 teacher_mean, teacher_std):
        super().__init__()
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())
        s_mean, s_std, t_mean, t_std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1)
                                        for v in (student_mean, student_std, teacher_mean, teacher_std))
        self.register_buffer("scale", s_std / t_std)
        self.register_buffer("shift", (s_mean - t_mean) / t_std)

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) student-normalised images -> (B, C) the teacher's class scores."""
        features = F.normalize(self.backbone(images * self.scale + self.shift).float(), dim=1)
        return features @ self.weight.T + self.bias

    @torch.no_grad()
    def targets(self, views, labels: Tensor):
        return labels.repeat(len(views)), torch.cat([self.logits(v) for v in views]), {}
