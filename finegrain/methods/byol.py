"""BYOL (Grill et al. 2020)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from finegrain.losses.negative_cosine import negative_cosine
from finegrain.methods.base import BackboneMethod, MomentumOptions, ProjectionOptions, embed_views
from finegrain.models.heads import PredictionHead, ProjectionHead
from finegrain.models.momentum import cosine_momentum, ema_update, momentum_copy
from finegrain.registry import PRETRAIN_METHODS


@PRETRAIN_METHODS.register("byol")
class BYOL(BackboneMethod):
    """BYOL (Grill et al. 2020): momentum target network and a predictor; no negatives, small batches work.

    The target (backbone + projection head) follows the online network by EMA with momentum rising
    from `moco_momentum` to 1 on a cosine schedule; it gets no gradient. loss = (D(q(z1), z2') +
    D(q(z2), z1')) / 2 with z' the target's projections and D the negative cosine similarity
    (BYOL's 2 - 2cos, halved and shifted). Small batches work. The predictor has the projector's
    shape (proj_dim -> hidden -> proj_dim), as in the paper.
    """

    @dataclass
    class Options(ProjectionOptions, MomentumOptions):
        pass

    base_lr = 0.05  # SGD, per 256 images (BYOL's LARS 0.2 does not carry over to SGD)

    def __init__(self, backbone: nn.Module, options: Options | None = None, *, freeze_bn: bool = False):
        super().__init__(backbone, options, freeze_bn=freeze_bn)
        dim, o = backbone.num_features, self.options
        self.head = ProjectionHead(dim, o.proj_hidden or dim, o.proj_dim)
        self.predictor = PredictionHead(o.proj_dim, o.proj_hidden or dim)
        self.target_backbone = momentum_copy(self.backbone)
        self.target_head = momentum_copy(self.head)

    def forward(self, views, labels=None):
        p1, p2 = self.predictor(self.head(embed_views(self.backbone, views[:2]))).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target_head(embed_views(self.target_backbone, views[:2])).chunk(2)
        return 0.5 * (negative_cosine(p1, t2) + negative_cosine(p2, t1)), {}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update of the target network."""
        m = cosine_momentum(step, total_steps, base=self.options.moco_momentum, final=1.0)
        ema_update(self.target_backbone, self.backbone, m)
        ema_update(self.target_head, self.head, m)
