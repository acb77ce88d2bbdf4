"""MoCo v2 (Chen et al. 2020)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from finegrain.config import POSITIVE, at_least, option
from finegrain.losses.info_nce import info_nce, update_queue
from finegrain.methods.base import BackboneMethod, HardNegativeOptions, MomentumOptions, ProjectionOptions, embed_views
from finegrain.models.heads import ProjectionHead
from finegrain.models.momentum import cosine_momentum, ema_update, momentum_copy
from finegrain.registry import PRETRAIN_METHODS


@PRETRAIN_METHODS.register("moco")
class MoCo(BackboneMethod):
    """MoCo v2 (Chen et al. 2020): momentum key encoder, a queue of negatives, InfoNCE.

    The key encoder (backbone + head) follows the online one by EMA with momentum rising from
    `moco_momentum` to 1 on a cosine schedule; the queue (K, proj_dim) and its pointer are
    buffers, so they are saved in checkpoints. Loss symmetrised over the two views. The projection
    head has no BatchNorm, as in MoCo v2.
    """

    @dataclass
    class Options(ProjectionOptions, MomentumOptions, HardNegativeOptions):
        temperature: float = option(0.2, "InfoNCE temperature.", check=POSITIVE)
        queue_size: int = option(4096, "Negatives kept in the queue.", check=at_least(1))

    base_lr = 0.06  # SGD, per 256 images (MoCo v2)

    def __init__(self, backbone: nn.Module, options: Options | None = None, *, freeze_bn: bool = False):
        super().__init__(backbone, options, freeze_bn=freeze_bn)
        dim, o = backbone.num_features, self.options
        self.head = ProjectionHead(dim, o.proj_hidden or dim, o.proj_dim, batch_norm=False)
        self.key_backbone = momentum_copy(self.backbone)
        self.key_head = momentum_copy(self.head)
        self.register_buffer("queue", nn.functional.normalize(torch.randn(o.queue_size, o.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending_keys: list[torch.Tensor] = []  # keys of this step's micro-batches, enqueued after the step

    def forward(self, views, labels=None):
        q1, q2 = self.head(embed_views(self.backbone, views[:2])).chunk(2)
        with torch.no_grad():
            k1, k2 = self.key_head(embed_views(self.key_backbone, views[:2])).chunk(2)
        queue, t, beta = self.queue.clone(), self.options.temperature, self.options.hard_negative_beta
        loss = 0.5 * (info_nce(q1, k2, queue, t, hard_negative_beta=beta) + info_nce(q2, k1, queue, t, hard_negative_beta=beta))
        if self.training:
            self._pending_keys.append(nn.functional.normalize(torch.cat([k1, k2]).float(), dim=1))
        return loss, {}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update of the key encoder; enqueue the step's keys."""
        m = cosine_momentum(step, total_steps, base=self.options.moco_momentum, final=1.0)
        ema_update(self.key_backbone, self.backbone, m)
        ema_update(self.key_head, self.head, m)
        for keys in self._pending_keys:
            self.queue_ptr.fill_(update_queue(self.queue, keys, int(self.queue_ptr)))
        self._pending_keys = []
