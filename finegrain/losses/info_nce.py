"""InfoNCE with a queue of negatives, the MoCo v2 loss (He et al. 2020, Chen et al. 2020).

Optionally with the hard-negative re-weighting of Robinson et al. 2021 (``hard_negative_beta``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from finegrain import dist
from finegrain.losses.nt_xent import check_hard_negative_beta, hard_negative_log_weights


def info_nce(
    q: Tensor, k: Tensor, queue: Tensor | None, temperature: float, hard_negative_beta: float = 0.0
) -> Tensor:
    """MoCo v2's InfoNCE: each query against its key (positive) and a queue of negatives.

    For query i, with all vectors L2-normalised here (cosine similarity):

        logits_i = [q_i . k_i, q_i . queue_1, ..., q_i . queue_K] / T,  target 0
        loss = mean_i cross_entropy(logits_i, 0)

    With ``queue`` None or empty (K = 0, e.g. the first step), the keys of the *other* images of the
    local batch serve as negatives instead: ``logits_i = [q_i . k_j]_j / T`` with target i (B = 1
    then gives a loss of 0). Nothing is gathered across ranks here: the queue already holds every
    rank's keys (see ``update_queue``).

    Hard negatives (Robinson, Chuang, Sra and Jegelka 2021, "Contrastive Learning with Hard
    Negative Samples", ICLR; the beta re-weighting only, without their tau+ debiasing): with
    ``hard_negative_beta`` = beta > 0, the M negatives n of query i (the K queue entries, or the
    M = B - 1 other keys of the batch when the queue is empty), with similarities s_in, are
    re-weighted by importance weights

        w_in = M * exp(beta * s_in) / sum_{m negative} exp(beta * s_im)     (average 1 over n)
        loss_i = -log( exp(s_i,pos / T) / (exp(s_i,pos / T) + sum_n w_in exp(s_in / T)) )

    so negatives more similar to the query (harder) weigh more, computed by adding ``log w_in`` to
    the negatives' logits. The weights carry no gradient (constants of the loss, the importance
    weights of the sampling distribution q_beta); Robinson et al.'s reference code instead uses
    ``exp(beta * s / T)`` (its beta is ``hard_negative_beta * T`` here) and backpropagates through
    them. With beta = 0 the plain loss above is computed, bit for bit.

    No gradient flows into ``k`` or ``queue`` (both are detached here): only the online encoder
    that produced ``q`` learns. Logits are computed in float32 with autocast disabled.

    Args:
        q: (B, D) queries from the online encoder (any scale, any float dtype).
        k: (B, D) keys of the other view of the same B images, from the momentum encoder.
        queue: (K, D) negatives (keys of earlier batches, any scale), or None.
        temperature: T > 0 dividing cosine similarities in [-1, 1]; MoCo v2 uses 0.2.
        hard_negative_beta: beta >= 0, in units of 1 / cosine similarity; 0 (the default) is the
            plain loss. The weights of two negatives whose similarities differ by 1 differ by e^beta.

    Returns:
        Scalar float32 tensor, in nats; ``log(K + 1)`` when all similarities are equal (with or
        without re-weighting: the weights are then all 1).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_hard_negative_beta(hard_negative_beta)
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must both be (B, D); got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue is not None and queue.numel() > 0 and (queue.ndim != 2 or queue.shape[1] != q.shape[1]):
        raise ValueError(f"queue must be (K, {q.shape[1]}); got {tuple(queue.shape)}")
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.detach().float(), dim=1)
        no_queue = queue is None or queue.numel() == 0
        if no_queue:
            sim = q @ k.T  # (B, B): positives on the diagonal
            target = torch.arange(q.shape[0], device=q.device)
        else:
            negatives = F.normalize(queue.detach().to(q.device, torch.float32), dim=1)  # (K, D)
            pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
            sim = torch.cat([pos, q @ negatives.T], dim=1)  # (B, 1 + K): positives in column 0
            target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        logits = sim / temperature
        if hard_negative_beta > 0:
            is_negative = torch.ones_like(sim, dtype=torch.bool)
            is_negative[torch.arange(q.shape[0], device=q.device), target] = False  # the positives
            logits = logits + hard_negative_log_weights(sim, is_negative, hard_negative_beta)
        return F.cross_entropy(logits, target)


@torch.no_grad()
def update_queue(queue: Tensor, keys: Tensor, ptr: int) -> int:
    """Write this step's keys of every rank into the ring buffer ``queue``, in place.

    Keys are gathered across ranks (rank order, no gradient) and stored *as given*, neither
    normalised nor otherwise changed apart from the cast to the queue's dtype/device (``info_nce``
    normalises the queue itself). Writing starts at ``ptr`` and wraps around the end, so K need not
    be a multiple of the global batch; if a step brings more than K keys, only the last K are kept.

    Args:
        queue: (K, D) buffer, modified in place; the same on every rank.
        keys: (B, D) keys of this rank's batch (the same B on every rank).
        ptr: index in [0, K) of the oldest entry, where writing starts.

    Returns:
        The new pointer, ``(ptr + world_size * B) % K``.
    """
    size = queue.shape[0]
    if size == 0:
        return 0
    if keys.ndim != 2 or keys.shape[1] != queue.shape[1]:
        raise ValueError(f"keys must be (B, {queue.shape[1]}); got {tuple(keys.shape)}")
    if not 0 <= ptr < size:
        raise ValueError(f"ptr must be in [0, {size}); got {ptr}")
    keys = dist.gather_no_grad(keys)  # (W*B, D)
    n = keys.shape[0]
    start = ptr
    if n > size:  # only the newest K survive; they land where a full write would leave them
        start = (ptr + n - size) % size
        keys = keys[-size:]
    idx = (start + torch.arange(keys.shape[0], device=queue.device)) % size
    queue[idx] = keys.to(queue.device, queue.dtype)
    return int((ptr + n) % size)
