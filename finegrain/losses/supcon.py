"""SupCon, the supervised contrastive loss of Khosla et al. 2020 (the "L_out" form, their eq. 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from finegrain.losses._candidates import _candidate_labels, _positive_mask, normalised_candidates


def supcon(z: Tensor, labels: Tensor, temperature: float, gather: bool = True) -> Tensor:
    """Supervised contrastive loss (SupCon "L_out"), with candidates from every rank.

    Every one of the N local rows is an anchor. Its candidates are all rows of the *global* batch
    (world_size * N rows, gathered with gradient from every rank when ``gather`` is True; labels
    gathered without), itself excluded; its positives P(i) are the candidates with its label. With
    cosine similarities s (the rows are L2-normalised here) divided by ``temperature``:

        loss_i = -(1 / |P(i)|) sum_{p in P(i)} log( exp(s_ip / T) / sum_{a != i} exp(s_ia / T) )

    Rows labelled -1 (unlabelled photos without a confident pseudo-label) take no part: they are
    neither anchors nor candidates. Anchors with no positive in the global batch (a class seen once) have no term: they are left
    out of the mean instead of giving 0/0 = NaN (the bug of SupContrast issues #20 and #141), but
    still serve as candidates of the other anchors. The loss is the mean of ``loss_i`` over the
    local anchors that have a positive; if none has one it is a zero that is still connected to
    the graph (so ``backward`` works, and under DDP every rank still runs the gather's backward).

    In a single process this is pytorch-metric-learning's ``SupConLoss(temperature=T)`` (whose
    default ``AvgNonZeroReducer`` averages over the anchors with a non-zero loss, i.e. those with a
    positive whenever there is a negative too). Under DDP the gradient convention is that of
    ``nt_xent``: do not rescale by the world size. The mean over ranks of this loss equals the loss
    of the global batch when every rank has the same number of anchors with a positive, which always
    holds when all views of an image are on the same rank and there are at least 2 views.

    Logits are computed in float32 with autocast disabled, so float16/bfloat16 inputs and autocast
    regions are safe; identical or zero vectors give a finite loss.

    Args:
        z: (N, D) projections of all views of the local batch, stacked (N = V * B; any scale, any
            float dtype).
        labels: (N,) integer class ids, the same for all views of one image; -1 = ignore the row.
        temperature: T > 0, dividing cosine similarities in [-1, 1]; SupCon uses 0.1.
        gather: use the other ranks' rows as candidates when ``world_size() > 1``. All ranks must
            then have the same N.

    Returns:
        Scalar float32 tensor, in nats, at least 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, labels, cand, cand_labels, pos, self_mask = normalised_candidates(z, labels, gather)  # cand (M, D)
        ignored = cand_labels < 0  # (M,)
        pos = pos & ~ignored[None, :]
        n_pos = pos.sum(dim=1)  # (N,)
        has_pos = n_pos > 0
        if not bool(has_pos.any()):
            return cand.sum() * 0.0  # through the gathered rows, so every rank's backward matches

        pos, n_pos = pos[has_pos], n_pos[has_pos]  # only anchors with a positive: (A, M)
        logits = (z[has_pos] @ cand.T / temperature).masked_fill(self_mask[has_pos] | ignored[None, :], float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        # log_prob is -inf at the anchor itself and at ignored rows, never positives: masked to 0 (grad 0)
        pos_log_prob = log_prob.masked_fill(~pos, 0.0).sum(dim=1)  # (A,)
        return (-pos_log_prob / n_pos).mean()


def supcon_anchors_without_positive(labels: Tensor, gather: bool = True) -> int:
    """How many local anchors have no positive (no other row of their class) in the global batch.

    These anchors contribute no term to ``supcon`` (for logging: with V >= 2 views per image it is
    always 0). Labels are gathered from every rank when ``gather`` and ``world_size() > 1``, as in
    ``supcon``, so every rank must call this.

    Args:
        labels: (N,) integer class ids of the local rows.
        gather: count positives among every rank's rows, not only the local ones.

    Returns:
        The count, in [0, N].
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be (N,); got {tuple(labels.shape)}")
    cand_labels, offset = _candidate_labels(labels, gather)
    pos, _ = _positive_mask(labels, cand_labels, offset)
    return int((~pos.any(dim=1)).sum())
