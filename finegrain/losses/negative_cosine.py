"""Negative cosine similarity with a stop-gradient target: the BYOL and SimSiam loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's D(p, z) (Chen & He 2021): minus the mean cosine similarity of predictions and targets.

        D(p, z) = -mean_i  (p_i / ||p_i||) . (z_i / ||z_i||),   z detached (stop-gradient)

    BYOL's loss (Grill et al. 2020), ||p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, z), is 2 + 2 D: the
    same minimiser and gradients up to a factor 2. No negatives: nothing is gathered across ranks.
    Computed in float32 with autocast disabled; zero vectors give 0 similarity (no NaN).

    Args:
        p: (B, D) predictions of the online branch (prediction head output).
        z: (B, D) targets: projections of the other view (momentum network for BYOL, the same
            network for SimSiam); no gradient flows into them.

    Returns:
        Scalar float32 tensor in [-1, 1]; -1 when every prediction points along its target.
    """
    if p.ndim != 2 or p.shape != z.shape:
        raise ValueError(f"p and z must both be (B, D); got {tuple(p.shape)} and {tuple(z.shape)}")
    with torch.autocast(device_type=p.device.type, enabled=False):
        return -F.cosine_similarity(p.float(), z.detach().float(), dim=1, eps=1e-8).mean()
