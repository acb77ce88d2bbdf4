"""SimCLR (Chen et al. 2020)."""

from __future__ import annotations

from torch import nn

from finegrain.losses.nt_xent import nt_xent
from finegrain.methods.base import BackboneMethod, embed_views
from finegrain.models.heads import ProjectionHead
from finegrain.registry import PRETRAIN_METHODS


@PRETRAIN_METHODS.register("simclr")
class SimCLR(BackboneMethod):
    """SimCLR (Chen et al. 2020): NT-Xent over 2B views gathered across ranks, on a projection MLP with BatchNorm.

    forward(views, labels): views two (B, 3, S, S) tensors, labels unused -> (loss, {}).
    """

    options = ("proj_dim", "proj_hidden", "temperature", "hard_negative_beta")
    default_temperature = 0.5
    base_lr = 0.3  # SGD/LARS, per 256 images

    def __init__(self, backbone: nn.Module, *, proj_dim: int = 128, proj_hidden: int = 0, temperature: float | None = None,
                 hard_negative_beta: float = 0.0, freeze_bn: bool = False):
        super().__init__(backbone, freeze_bn=freeze_bn)
        dim = backbone.num_features
        self.head = ProjectionHead(dim, proj_hidden or dim, proj_dim)
        self.temperature = self.default_temperature if temperature is None else temperature
        self.hard_negative_beta = hard_negative_beta

    def forward(self, views, labels=None):
        z1, z2 = self.head(embed_views(self.backbone, views[:2])).chunk(2)
        return nt_xent(z1, z2, temperature=self.temperature, hard_negative_beta=self.hard_negative_beta), {}
