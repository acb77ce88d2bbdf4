"""Self-supervised methods for `pretrain`: each a small nn.Module the engine trains.

forward(views, labels) -> (loss, metrics); views: list of two (B, 3, S, S) tensors; labels unused.
`embed(images) -> (B, D)` gives the backbone's pooled features (what later stages use), and
`freeze_bn` keeps the backbone's BatchNorm as loaded (see finegrain.models.method). Registered by
name in METHODS.
"""

from __future__ import annotations

import torch
from torch import nn

from finegrain.losses.info_nce import info_nce, update_queue
from finegrain.losses.negative_cosine import negative_cosine
from finegrain.losses.nt_xent import nt_xent
from finegrain.models.backbone import embed_views
from finegrain.models.heads import PredictionHead, ProjectionHead
from finegrain.models.method import BackboneMethod
from finegrain.models.momentum import cosine_momentum, ema_update, momentum_copy


class SimCLR(BackboneMethod):
    """SimCLR (Chen et al. 2020): backbone + projection MLP, NT-Xent over 2B views gathered across ranks."""

    default_temperature = 0.5
    base_lr = 0.3  # SGD/LARS, per 256 images

    def __init__(self, backbone: nn.Module, *, proj_dim: int = 128, proj_hidden: int = 0, temperature: float | None = None,
                 hard_negative_beta: float = 0.0, freeze_bn: bool = False, **_):
        super().__init__(backbone, freeze_bn=freeze_bn)
        dim = backbone.num_features
        self.head = ProjectionHead(dim, proj_hidden or dim, proj_dim)
        self.temperature = temperature or self.default_temperature
        self.hard_negative_beta = hard_negative_beta

    def forward(self, views, labels=None):
        x1, x2 = views[:2]
        z = self.head(embed_views(self.backbone, (x1, x2)))
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, temperature=self.temperature, hard_negative_beta=self.hard_negative_beta), {}


class MoCo(BackboneMethod):
    """MoCo v2 (Chen et al. 2020): momentum key encoder, a queue of negatives, InfoNCE.

    The key encoder (backbone + head) follows the online one by EMA with momentum rising from
    `moco_momentum` to 1 on a cosine schedule; the queue (K, proj_dim) and its pointer are
    buffers, so they are saved in checkpoints. Loss symmetrised over the two views.
    """

    default_temperature = 0.2
    base_lr = 0.06  # SGD, per 256 images (MoCo v2)

    def __init__(self, backbone: nn.Module, *, proj_dim: int = 128, proj_hidden: int = 0, temperature: float | None = None,
                 queue_size: int = 4096, moco_momentum: float = 0.99, hard_negative_beta: float = 0.0,
                 freeze_bn: bool = False, **_):
        super().__init__(backbone, freeze_bn=freeze_bn)
        dim = backbone.num_features
        self.head = ProjectionHead(dim, proj_hidden or dim, proj_dim)
        self.key_backbone = momentum_copy(self.backbone)
        self.key_head = momentum_copy(self.head)
        self.temperature = temperature or self.default_temperature
        self.base_momentum = moco_momentum
        self.hard_negative_beta = hard_negative_beta
        self.register_buffer("queue", nn.functional.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending_keys: list[torch.Tensor] = []  # keys of this step's micro-batches, enqueued after the step

    def forward(self, views, labels=None):
        x1, x2 = views[:2]
        q1, q2 = self.head(embed_views(self.backbone, (x1, x2))).chunk(2)
        with torch.no_grad():
            k1, k2 = self.key_head(embed_views(self.key_backbone, (x1, x2))).chunk(2)
        queue = self.queue.clone()
        beta = self.hard_negative_beta
        loss = 0.5 * (info_nce(q1, k2, queue, self.temperature, hard_negative_beta=beta)
                      + info_nce(q2, k1, queue, self.temperature, hard_negative_beta=beta))
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


class SimSiam(BackboneMethod):
    """SimSiam (Chen & He 2021): projection + prediction heads, stop-gradient, no negatives, no momentum network.

    loss = (D(h(z1), z2) + D(h(z2), z1)) / 2 with D the negative cosine similarity and z the
    projections (targets detached). Works with small batches (no negatives to gather). The
    predictor is a bottleneck MLP sized from the projection dimension (proj_dim -> proj_dim / 4 ->
    proj_dim, as the paper's 2048 -> 512 -> 2048).
    """

    base_lr = 0.05  # SGD, per 256 images (SimSiam)

    def __init__(self, backbone: nn.Module, *, proj_dim: int = 128, proj_hidden: int = 0, freeze_bn: bool = False, **_):
        super().__init__(backbone, freeze_bn=freeze_bn)
        dim = backbone.num_features
        self.head = ProjectionHead(dim, proj_hidden or dim, proj_dim)
        self.predictor = PredictionHead(proj_dim)

    def forward(self, views, labels=None):
        x1, x2 = views[:2]
        z1, z2 = self.head(embed_views(self.backbone, (x1, x2))).chunk(2)
        p1, p2 = self.predictor(torch.cat([z1, z2])).chunk(2)
        return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1)), {}


class BYOL(BackboneMethod):
    """BYOL (Grill et al. 2020): online backbone + projection + prediction heads, a momentum target network.

    The target (backbone + projection head) follows the online network by EMA with momentum rising
    from `moco_momentum` to 1 on a cosine schedule; it gets no gradient. loss = (D(q(z1), z2') +
    D(q(z2), z1')) / 2 with z' the target's projections and D the negative cosine similarity
    (BYOL's 2 - 2cos, halved and shifted). No negatives: small batches work. The predictor has
    the projector's shape (proj_dim -> hidden -> proj_dim), as in the paper.
    """

    base_lr = 0.05  # SGD, per 256 images (BYOL's LARS 0.2 does not carry over to SGD)

    def __init__(self, backbone: nn.Module, *, proj_dim: int = 128, proj_hidden: int = 0, moco_momentum: float = 0.99,
                 freeze_bn: bool = False, **_):
        super().__init__(backbone, freeze_bn=freeze_bn)
        dim = backbone.num_features
        self.head = ProjectionHead(dim, proj_hidden or dim, proj_dim)
        self.predictor = PredictionHead(proj_dim, proj_hidden or dim)
        self.target_backbone = momentum_copy(self.backbone)
        self.target_head = momentum_copy(self.head)
        self.base_momentum = moco_momentum

    def forward(self, views, labels=None):
        x1, x2 = views[:2]
        p1, p2 = self.predictor(self.head(embed_views(self.backbone, (x1, x2)))).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target_head(embed_views(self.target_backbone, (x1, x2))).chunk(2)
        return 0.5 * (negative_cosine(p1, t2) + negative_cosine(p2, t1)), {}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """After each optimizer step: EMA update of the target network."""
        m = cosine_momentum(step, total_steps, base=self.base_momentum, final=1.0)
        ema_update(self.target_backbone, self.backbone, m)
        ema_update(self.target_head, self.head, m)


METHODS = {"simclr": SimCLR, "moco": MoCo, "byol": BYOL, "simsiam": SimSiam}
