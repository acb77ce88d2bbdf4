"""SimSiam (Chen & He 2021)."""

from __future__ import annotations

import torch
from torch import nn

from finegrain.losses.negative_cosine import negative_cosine
from finegrain.methods.base import BackboneMethod, ProjectionOptions, embed_views
from finegrain.models.heads import PredictionHead, ProjectionHead
from finegrain.registry import PRETRAIN_METHODS


@PRETRAIN_METHODS.register("simsiam")
class SimSiam(BackboneMethod):
    """SimSiam (Chen & He 2021): predictor and stop-gradient; no negatives, no momentum network.

    loss = (D(h(z1), z2) + D(h(z2), z1)) / 2 with D the negative cosine similarity and z the
    projections (targets detached). Works with small batches (no negatives to gather). The
    predictor is a bottleneck MLP sized from the projection dimension (proj_dim -> proj_dim / 4 ->
    proj_dim, as the paper's 2048 -> 512 -> 2048).
    """

    Options = ProjectionOptions
    base_lr = 0.05  # SGD, per 256 images (SimSiam)

    def __init__(self, backbone: nn.Module, options: ProjectionOptions | None = None, *, freeze_bn: bool = False):
        super().__init__(backbone, options, freeze_bn=freeze_bn)
        dim, o = backbone.num_features, self.options
        self.head = ProjectionHead(dim, o.proj_hidden or dim, o.proj_dim)
        self.predictor = PredictionHead(o.proj_dim)

    def forward(self, views, labels=None):
        z1, z2 = self.head(embed_views(self.backbone, views[:2])).chunk(2)
        p1, p2 = self.predictor(torch.cat([z1, z2])).chunk(2)
        return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1)), {}
