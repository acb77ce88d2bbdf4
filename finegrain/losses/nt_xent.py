"""NT-Xent, the SimCLR loss (Chen et al. 2020): normalised temperature-scaled cross-entropy over 2N views.

Optionally with the hard-negative re-weighting of Robinson et al. 2021 (``hard_negative_beta``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from finegrain import dist


def check_hard_negative_beta(beta: float) -> None:
    """ValueError unless ``beta`` is a finite number >= 0 (NaN and inf are rejected too)."""
    if not (0.0 <= beta and math.isfinite(beta)):
        raise ValueError(f"hard_negative_beta must be a finite number >= 0, got {beta}")


@torch.no_grad()
def hard_negative_log_weights(sim: Tensor, negatives: Tensor, beta: float) -> Tensor:
    """Log importance weights of the negatives, ``log w_ij``, for Robinson et al.'s hard-negative re-weighting.

    For anchor i with M_i negatives (the True entries of row i of ``negatives``):

        w_ij = M_i * exp(beta * s_ij) / sum_{k negative} exp(beta * s_ik)     (mean of w_ij over j is 1)
        log w_ij = log M_i + beta * s_ij - logsumexp_{k negative}(beta * s_ik)

    computed stably, without gradient (the weights are constants of the loss). Entries that are not
    negatives (positives, the anchor itself) get log w = 0, i.e. weight 1, so that adding the
    result to the logits changes only the negatives; a row without negatives is all 0.

    Args:
        sim: (R, C) cosine similarities of R anchors with C candidates (float32, in [-1, 1]).
        negatives: (R, C) bool, True where the candidate is a negative of the anchor.
        beta: concentration >= 0, in units of 1 / cosine similarity (0 gives w = 1 everywhere).

    Returns:
        (R, C) float tensor of log weights, detached.
    """
    scores = (beta * sim.detach()).masked_fill(~negatives, float("-inf"))
    count = negatives.sum(dim=1, keepdim=True).to(sim.dtype)  # M_i; log 0 = -inf in rows without negatives
    log_w = count.log() + scores - torch.logsumexp(scores, dim=1, keepdim=True)
    return log_w.masked_fill(~negatives, 0.0)  # also replaces the NaN of rows without negatives


def nt_xent(
    z1: Tensor, z2: Tensor, temperature: float, gather: bool = True, hard_negative_beta: float = 0.0
) -> Tensor:
    """SimCLR's NT-Xent loss over the two views of a batch, with negatives from every rank.

    Every one of the 2B local views is an anchor. Its positive is the other view of the same image;
    its negatives are all other views of the *global* batch (2 * world_size * B views, gathered
    with gradient from every rank when ``gather`` is True), its own similarity excluded. Similarity
    is cosine similarity (the projections are L2-normalised here), divided by ``temperature``:

        loss_i = -log( exp(s_i,pos / T) / sum_{j != i} exp(s_ij / T) )

    and the loss is the mean of ``loss_i`` over the 2B local anchors. In a single process this is
    the symmetric cross-entropy over 2N views of lightly's ``NTXentLoss(temperature=T)``. Under
    DDP, the mean over ranks of this loss equals the loss of the global batch, and DDP's gradient
    averaging yields exactly that loss's gradient: do not rescale it by the world size (see
    ``finegrain.dist``).

    Hard negatives (Robinson, Chuang, Sra and Jegelka 2021, "Contrastive Learning with Hard
    Negative Samples", ICLR; the beta re-weighting only, without their tau+ debiasing): with
    ``hard_negative_beta`` = beta > 0, the M = 2 * world_size * B - 2 negatives j of anchor i (all
    views but itself and its positive) are re-weighted by importance weights

        w_ij = M * exp(beta * s_ij) / sum_{k negative of i} exp(beta * s_ik)     (average 1 over j)
        loss_i = -log( exp(s_i,pos / T) / (exp(s_i,pos / T) + sum_{j negative of i} w_ij exp(s_ij / T)) )

    so negatives more similar to the anchor (harder) weigh more. It is computed by adding
    ``log w_ij`` to the negatives' logits. The weights are computed without gradient (constants
    of the loss, the importance weights of the sampling distribution q_beta). Note that Robinson et
    al.'s reference code (github.com/joshr17/HCL, ``image/main.py``) instead uses ``exp(beta * s / T)``
    (its beta is ``hard_negative_beta * T`` here) and backpropagates through the weights. With
    beta = 0 all w_ij = 1 and the plain loss above is computed, bit for bit.

    Logits are computed in float32 with autocast disabled, so float16/bfloat16 inputs and autocast
    regions are safe; identical or zero vectors give a finite loss.

    Args:
        z1: (B, D) projections of the first view of B images (any scale; any float dtype).
        z2: (B, D) projections of the second view of the same B images, same order.
        temperature: T > 0, dividing cosine similarities in [-1, 1]. SimCLR uses 0.1-0.5.
        gather: use the other ranks' views as negatives when ``world_size() > 1``. All ranks must
            then have the same B.
        hard_negative_beta: beta >= 0, in units of 1 / cosine similarity; 0 (the default) is the
            plain loss. The weights of two negatives whose similarities differ by 1 differ by e^beta.

    Returns:
        Scalar float32 tensor, in nats; at least 0, ``log(2 * world_size * B - 1)`` when all
        similarities are equal (with or without re-weighting: the weights are then all 1).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_hard_negative_beta(hard_negative_beta)
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be (B, D); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    b = z1.shape[0]
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z1 = F.normalize(z1.float(), dim=1)
        z2 = F.normalize(z2.float(), dim=1)
        if gather and dist.world_size() > 1:
            world, offset = dist.world_size(), dist.rank() * b
            g1, g2 = dist.gather_with_grad(z1), dist.gather_with_grad(z2)  # (W*B, D) each
        else:
            world, offset = 1, 0
            g1, g2 = z1, z2
        n = world * b  # images in the global batch
        anchors = torch.cat([z1, z2], dim=0)  # (2B, D): local views 1 then views 2
        candidates = torch.cat([g1, g2], dim=0)  # (2N, D): global views 1 then views 2
        sim = anchors @ candidates.T  # (2B, 2N) cosine similarities
        logits = sim / temperature

        local = torch.arange(b, device=z1.device) + offset  # global image index of each local row
        self_idx = torch.cat([local, local + n])  # where each anchor sits among the candidates
        pos_idx = torch.cat([local + n, local])  # its other view
        rows = torch.arange(2 * b, device=z1.device)
        logits = logits.index_put((rows, self_idx), torch.tensor(float("-inf"), device=z1.device))
        if hard_negative_beta > 0:
            negatives = torch.ones_like(sim, dtype=torch.bool)
            negatives[rows, self_idx] = False
            negatives[rows, pos_idx] = False
            logits = logits + hard_negative_log_weights(sim, negatives, hard_negative_beta)
        return F.cross_entropy(logits, pos_idx)
