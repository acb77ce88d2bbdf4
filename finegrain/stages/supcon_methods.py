"""Supervised objectives for `supcon`: a head on the backbone's pooled features plus a loss, by name.

Every objective trains on the same engine, sampler and views, so `--loss supcon|triplet|contrastive|ce` compare
fairly. Adding one is one `Objective` line in OBJECTIVES.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.losses.contrastive import contrastive
from finegrain.losses.supcon import supcon
from finegrain.losses.triplet import batch_hard_triplet
from finegrain.models.backbone import embed_views
from finegrain.models.heads import ProjectionHead
from finegrain.models.method import BackboneMethod


@dataclass(frozen=True)
class Objective:
    """make_head(embedding_dim, num_classes, options) -> nn.Module; loss(head_out, labels, options) -> scalar."""

    make_head: Callable[[int, int, dict], nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]
    description: str


def _projection(dim: int, num_classes: int, o: dict) -> nn.Module:
    return ProjectionHead(dim, o["proj_hidden"] or dim, o["proj_dim"])


def _classifier(dim: int, num_classes: int, o: dict) -> nn.Module:
    return nn.Linear(dim, num_classes)


class ProjectionAndClassifier(nn.Module):
    """Two heads on the same pooled features: (B, D) -> ((B, proj_dim) projection, (B, classes) logits)."""

    def __init__(self, dim: int, num_classes: int, o: dict):
        super().__init__()
        self.projection = _projection(dim, num_classes, o)
        self.classifier = _classifier(dim, num_classes, o)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.projection(features), self.classifier(features)


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor, o: dict) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, label_smoothing=o["label_smoothing"])


def _supcon_plus_ce(out: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor, o: dict) -> torch.Tensor:
    z, logits = out
    return supcon(z, y, temperature=o["temperature"]) + o["ce_weight"] * _cross_entropy(logits, y, o)


OBJECTIVES: dict[str, Objective] = {
    "supcon": Objective(_projection, lambda z, y, o: supcon(z, y, temperature=o["temperature"]),
                        "SupCon (Khosla et al. 2020): all same-class views in the batch are positives"),
    "triplet": Objective(_projection, lambda z, y, o: batch_hard_triplet(z, y, margin=o["margin"]),
                         "batch-hard triplet (Hermans et al. 2017)"),
    "contrastive": Objective(_projection, lambda z, y, o: contrastive(z, y, pos_margin=0.0, neg_margin=o["neg_margin"]),
                             "pairwise margin loss (Hadsell et al. 2006): same class pulled together, others "
                             "pushed past the margin"),
    "ce": Objective(_classifier, _cross_entropy, "cross-entropy with label smoothing (baseline)"),
    "supcon_ce": Objective(ProjectionAndClassifier, _supcon_plus_ce,
                           "SupCon on a projection head + ce_weight x cross-entropy on a linear classifier, "
                           "both on the backbone features"),
}


class SupervisedMethod(BackboneMethod):
    """Backbone + objective head, trained by `finegrain.engine.loop.fit`.

    forward(views, labels): views is a list of V tensors (B, 3, S, S); all V*B views are embedded
    in one backbone pass and the loss sees (V*B, ...) outputs with labels repeated V times.

    Args:
        backbone: timm model giving pooled features (B, D).
        objective: a name in OBJECTIVES.
        num_classes: classes in the labelled train split (for ce).
        options: proj_dim, proj_hidden, temperature, margin, neg_margin, label_smoothing, ce_weight.
        freeze_bn: keep every backbone BatchNorm in eval mode with frozen affine parameters.
        head_warmup_steps: optimizer steps during which only the head trains (backbone run under
            no_grad, so its parameters get no gradient and no weight decay).
    """

    find_unused_parameters = True  # the backbone is outside the graph during head warm-up (DDP)

    def __init__(self, backbone: nn.Module, objective: str, *, num_classes: int, options: dict,
                 freeze_bn: bool = True, head_warmup_steps: int = 0):
        super().__init__(backbone, freeze_bn=freeze_bn)
        self.objective = OBJECTIVES[objective]
        self.options = dict(options)
        self.head = self.objective.make_head(backbone.num_features, num_classes, self.options)
        self.head_warmup_steps = head_warmup_steps
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # saved in checkpoints

    def forward(self, views, labels):
        y = labels.repeat(len(views))
        if self.training and int(self.steps_done) < self.head_warmup_steps:
            with torch.no_grad():
                features = embed_views(self.backbone, views)
        else:
            features = embed_views(self.backbone, views)
        out = self.head(features)
        loss = self.objective.loss(out, y, self.options)
        with torch.no_grad():
            same = y[:, None] == y[None, :]
            metrics = {"positives_per_anchor": (same.sum(1) - 1).float().mean()}
            logits = out[1] if isinstance(out, tuple) else out if isinstance(self.head, nn.Linear) else None
            if logits is not None:  # a classifier: report its train accuracy
                metrics["accuracy"] = (logits.argmax(1) == y).float().mean()
        return loss, metrics

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Count optimizer steps (ends the head-only warm-up)."""
        self.steps_done.fill_(step)
