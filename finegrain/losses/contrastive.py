"""Contrastive (pairwise margin) loss of Hadsell, Chopra and LeCun 2006, as pytorch-metric-learning computes it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from finegrain.losses._candidates import normalised_candidates
from finegrain.losses.triplet import _MIN_SQUARED_DISTANCE


def _mean_of_nonzero(terms: Tensor) -> Tensor:
    """Mean of the entries > 0 of ``terms`` (all >= 0); 0 (still in the graph) if there are none.

    Written without boolean indexing, so there is no host synchronisation: the zeros add nothing to
    the sum, and the count is clamped to 1 so that an all-zero input gives 0 / 1.
    """
    count = (terms > 0).sum()
    return terms.sum() / count.clamp(min=1)


def contrastive(
    z: Tensor, labels: Tensor, pos_margin: float, neg_margin: float, gather: bool = True
) -> Tensor:
    """Pairwise contrastive loss on L2-normalised embeddings, with candidates from every rank.

    Hadsell, Chopra and LeCun 2006, "Dimensionality Reduction by Learning an Invariant Mapping"
    (CVPR), in the form of pytorch-metric-learning 2.9's ``losses.ContrastiveLoss(pos_margin,
    neg_margin)`` with its defaults: ``LpDistance`` (Euclidean distance between L2-normalised rows,
    in [0, 2], *not* squared) and ``AvgNonZeroReducer``. Every one of the N local rows is an anchor;
    its candidates are all rows of the *global* batch (world_size * N rows, gathered with gradient
    from every rank when ``gather`` is True; labels gathered without), itself excluded. Over the
    ordered pairs (i, j), so each pair of local rows counts twice, as in PML:

        positive pairs (y_j = y_i, j != i):  l+_ij = relu(d_ij - pos_margin)
        negative pairs (y_j != y_i):         l-_ij = relu(neg_margin - d_ij)
        loss = mean of the l+_ij > 0  +  mean of the l-_ij > 0

    i.e. each of the two averages runs over its *non-zero* terms only (pairs already within their
    margin are left out of the count), and an average with no non-zero term is 0. If both are 0
    (every margin satisfied, or no pair at all) the loss is a zero still connected to the graph, so
    ``backward`` works and, under DDP, every rank still runs the gather's backward.

    Under DDP the gradient convention is that of ``nt_xent``: do not rescale by the world size. Each
    rank averages over the non-zero terms of its own anchors, so the mean over ranks equals the loss
    of the global batch only when every rank has the same number of non-zero positive terms and of
    non-zero negative terms (in general it is close to it, not equal).

    Distances are computed in float32 with autocast disabled, as ``sqrt(clamp(2 - 2 cos, 1e-12))``
    (as in ``batch_hard_triplet``), so identical vectors give finite gradients. One consequence: two
    identical rows of one class are at distance 1e-6 rather than 0, so with ``pos_margin = 0`` their
    (gradient-free, ~1e-6) term is counted in the positive average, where PML's exact ``cdist`` gives
    0 and leaves it out. For rows that are not identical, the two agree to float32 rounding.

    Args:
        z: (N, D) embeddings of the local batch (any scale, any float dtype).
        labels: (N,) integer class ids.
        pos_margin: m+ >= 0: positive pairs closer than this cost nothing; in units of the distance
            between unit vectors (at most 2).
        neg_margin: m- >= 0: negative pairs farther apart than this cost nothing; same units (PML's
            default is 1). Two orthogonal unit vectors are sqrt(2) apart.
        gather: use the other ranks' rows as candidates when ``world_size() > 1``. All ranks must
            then have the same N.

    Returns:
        Scalar float32 tensor, in distance units, in [0, (2 - pos_margin) + neg_margin].
    """
    for name, value in (("pos_margin", pos_margin), ("neg_margin", neg_margin)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, labels, cand, cand_labels, pos, _ = normalised_candidates(z, labels, gather)  # pos: same class, not self
        neg = labels[:, None] != cand_labels[None, :]  # never the anchor itself
        d = (2.0 - 2.0 * (z @ cand.T)).clamp(min=_MIN_SQUARED_DISTANCE).sqrt()  # (N, M)
        pos_terms = F.relu(d - pos_margin).masked_fill(~pos, 0.0)
        neg_terms = F.relu(neg_margin - d).masked_fill(~neg, 0.0)
        return _mean_of_nonzero(pos_terms) + _mean_of_nonzero(neg_terms)
