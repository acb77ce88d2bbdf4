"""NT-Xent, the SimCLR loss (Chen et al. 2020): normalised temperature-scaled cross-entropy over 2N views."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from finegrain import dist


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5, gather: bool = True) -> Tensor:
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

    Logits are computed in float32 with autocast disabled, so float16/bfloat16 inputs and autocast
    regions are safe; identical or zero vectors give a finite loss.

    Args:
        z1: (B, D) projections of the first view of B images (any scale; any float dtype).
        z2: (B, D) projections of the second view of the same B images, same order.
        temperature: T > 0, dividing cosine similarities in [-1, 1]. SimCLR uses 0.1-0.5.
        gather: use the other ranks' views as negatives when ``world_size() > 1``. All ranks must
            then have the same B.

    Returns:
        Scalar float32 tensor, in nats; at least 0, ``log(2 * world_size * B - 1)`` when all
        similarities are equal.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
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
        logits = anchors @ candidates.T / temperature  # (2B, 2N)

        local = torch.arange(b, device=z1.device) + offset  # global image index of each local row
        self_idx = torch.cat([local, local + n])  # where each anchor sits among the candidates
        pos_idx = torch.cat([local + n, local])  # its other view
        rows = torch.arange(2 * b, device=z1.device)
        logits = logits.index_put((rows, self_idx), torch.tensor(float("-inf"), device=z1.device))
        return F.cross_entropy(logits, pos_idx)
