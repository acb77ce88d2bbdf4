"""Self-supervised methods for `pretrain`: each a small nn.Module the engine trains.

forward(views, labels) -> (loss, metrics); views: list of two (B, 3, S, S) tensors; labels unused.
`embed(images) -> (B, D)` gives the backbone's pooled features (what later stages use).
Registered by name in METHODS.
"""

from __future__ import annotations

import torch
from torch import nn

from finegrain.losses.info_nce import info_nce, update_queue
from finegrain.losses.nt_xent import nt_xent
from finegrain.models.heads import ProjectionHead
from finegrain.models.momentum import cosine_momentum, ema_update, momentum_copy


class SimCLR(nn.Module):
    """SimCLR (Chen et al. 2020): backbone + projection MLP, NT-Xent over 2B views gathered across ranks."""

    default_temperature = 0.5
    base_lr = 0.3  # SGD/LARS, per 256 images

    def __init__(self, backbone: nn.Module, *, proj_dim: int = 128, proj_hidden: int = 0, temperature: float | None = None, **_):
        super().__init__()
        dim = backbone.num_features
        self.backbone = backbone
        self.head = ProjectionHead(dim, proj_hidden or dim, proj_dim)
        self.temperature = temperature or self.default_temperature

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D) pooled backbone features."""
        return self.backbone(images)

    def forward(self, views, labels=None):
        x1, x2 = views[:2]
        z = self.head(self.backbone(torch.cat([x1, x2])))
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, temperature=self.temperature), {}


class MoCo(nn.Module):
    """MoCo v2 (Chen et al. 2020): momentum key encoder, a queue of negatives, InfoNCE.

    The key encoder (backbone + head) follows the online one by EMA with momentum rising from
    `moco_momentum` to 1 on a cosine schedule; the queue (K, proj_dim) and its pointer are
    buffers, so they are saved in checkpoints. Loss symmetrised over the two views.
    """

    default_temperature = 0.2
    base_lr = 0.06  # SGD, per 256 images (MoCo v2)

    def __init__(self, backbone: nn.Module, *, proj_dim: int = 128, proj_hidden: int = 0, temperature: float | None = None,
                 queue_size: int = 4096, moco_momentum: float = 0.99, **_):
        super().__init__()
        dim = backbone.num_features
        self.backbone = backbone
        self.head = ProjectionHead(dim, proj_hidden or dim, proj_dim)
        self.key_backbone = momentum_copy(self.backbone)
        self.key_head = momentum_copy(self.head)
        self.temperature = temperature or self.default_temperature
        self.base_momentum = moco_momentum
        self.register_buffer("queue", nn.functional.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending_keys: list[torch.Tensor] = []  # keys of this step's micro-batches, enqueued after the step

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D) pooled features of the online backbone."""
        return self.backbone(images)

    def forward(self, views, labels=None):
        x1, x2 = views[:2]
        q1, q2 = self.head(self.backbone(torch.cat([x1, x2]))).chunk(2)
        with torch.no_grad():
            k1, k2 = self.key_head(self.key_backbone(torch.cat([x1, x2]))).chunk(2)
        queue = self.queue.clone()
        loss = 0.5 * (info_nce(q1, k2, queue, self.temperature) + info_nce(q2, k1, queue, self.temperature))
        if self.training:
            self._pending_keys.append(nn.functional.normalize(torch.cat([k1, k2]).float(), dim=1))
        return loss, {}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """After each optimizer step: EMA update of the key encoder, enqueue the step's keys."""
        m = cosine_momentum(step, total_steps, base=self.base_momentum, final=1.0)
        ema_update(self.key_backbone, self.backbone, m)
        ema_update(self.key_head, self.head, m)
        for keys in self._pending_keys:
            self.queue_ptr.fill_(update_queue(self.queue, keys, int(self.queue_ptr)))
        self._pending_keys = []


METHODS = {"simclr": SimCLR, "moco": MoCo}
