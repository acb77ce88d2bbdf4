"""Batch-hard triplet loss (Hermans, Beyer and Leibe 2017, "In Defense of the Triplet Loss")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from finegrain.losses._candidates import normalised_candidates

# squared distances are clamped to this before the square root: d = 1e-6 at most for identical
# vectors, whose gradient is then 0 instead of the NaN of sqrt'(0) = inf times 0
_MIN_SQUARED_DISTANCE = 1e-12


def batch_hard_triplet(z: Tensor, labels: Tensor, margin: float, gather: bool = True) -> Tensor:
    """Batch-hard triplet loss on L2-normalised embeddings, with candidates from every rank.

    Every one of the N local rows is an anchor; its candidates are all rows of the *global* batch
    (world_size * N rows, gathered with gradient from every rank when ``gather`` is True; labels
    gathered without), itself excluded. With d the Euclidean distance between the L2-normalised
    rows (in [0, 2]), the hardest positive is the *farthest* candidate of the anchor's class and the
    hardest negative the *closest* candidate of another class:

        loss_i = relu( max_{p: y_p = y_i, p != i} d_ip - min_{n: y_n != y_i} d_in + margin )

    The loss is the mean of ``loss_i`` over the local anchors that have both a positive and a
    negative, zeros included (unlike pytorch-metric-learning's default ``AvgNonZeroReducer``: this is
    its ``BatchHardMiner`` + ``TripletMarginLoss(margin)`` with ``reducer=MeanReducer()``); if no
    anchor has both it is a zero still connected to the graph (so ``backward`` works, and under DDP
    every rank still runs the gather's backward). Only the mined distances get gradient.

    Under DDP the gradient convention is that of ``nt_xent``: do not rescale by the world size. The
    mean over ranks equals the loss of the global batch when every rank has the same number of
    anchors with both a positive and a negative (always, e.g., with a P x K class-balanced sampler,
    P >= 2 and K >= 2 on every rank).

    Distances are computed in float32 with autocast disabled, as ``sqrt(clamp(2 - 2 cos, 1e-12))``,
    so identical vectors give finite gradients (zero through their own distance).

    Args:
        z: (N, D) embeddings of the local batch (any scale, any float dtype).
        labels: (N,) integer class ids.
        margin: m >= 0, in units of the distance between unit vectors (at most 2); Hermans et al.
            use 0.2 or so on unnormalised embeddings, FaceNet 0.2 on normalised ones.
        gather: use the other ranks' rows as candidates when ``world_size() > 1``. All ranks must
            then have the same N.

    Returns:
        Scalar float32 tensor, in distance units, in [0, 2 + margin].
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, labels, cand, cand_labels, pos, _ = normalised_candidates(z, labels, gather)  # pos: same class, not self
        neg = labels[:, None] != cand_labels[None, :]  # never the anchor itself
        valid = pos.any(dim=1) & neg.any(dim=1)  # (N,)
        if not bool(valid.any()):
            return cand.sum() * 0.0  # through the gathered rows, so every rank's backward matches

        z, pos, neg = z[valid], pos[valid], neg[valid]
        d = (2.0 - 2.0 * (z @ cand.T)).clamp(min=_MIN_SQUARED_DISTANCE).sqrt()  # (K, M)
        hardest_pos = d.masked_fill(~pos, float("-inf")).max(dim=1).values  # (K,)
        hardest_neg = d.masked_fill(~neg, float("inf")).min(dim=1).values  # (K,)
        return F.relu(hardest_pos - hardest_neg + margin).mean()
