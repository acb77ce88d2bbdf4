"""SimCLR (Chen et al. 2020)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from finegrain.config import POSITIVE, option
from finegrain.losses.nt_xent import nt_xent
from finegrain.methods.base import BackboneMethod, HardNegativeOptions, ProjectionOptions, embed_views
from finegrain.models.heads import ProjectionHead
from finegrain.registry import PRETRAIN_METHODS


@PRETRAIN_METHODS.register("simclr")
class SimCLR(BackboneMethod):
    """SimCLR (Chen et al. 2020): NT-Xent over 2B views gathered across ranks, on a projection MLP with BatchNorm.

    forward(views, labels): views two (B, 3, S, S) tensors, labels unused -> (loss, {}).
    """

    @dataclass
    class Options(ProjectionOptions, HardNegativeOptions):
        temperature: float = option(0.5, "NT-Xent temperature.", check=POSITIVE)

    base_lr = 0.3  # SGD/LARS, per 256 images

    def __init__(self, backbone: nn.Module, options: Options | None = None, *, freeze_bn: bool = False):
        super().__init__(backbone, options, freeze_bn=freeze_bn)
        dim = backbone.num_features
        self.head = ProjectionHead(dim, self.options.proj_hidden or dim, self.options.proj_dim)

    def forward(self, views, labels=None):
        z1, z2 = self.head(embed_views(self.backbone, views[:2])).chunk(2)
        loss = nt_xent(z1, z2, temperature=self.options.temperature, hard_negative_beta=self.options.hard_negative_beta)
        return loss, {}
