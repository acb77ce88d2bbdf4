"""Anchors and candidates shared by the supervised batch losses (SupCon, triplet): labels, gathering, masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from finegrain import dist


def _check_labels(z: Tensor, labels: Tensor) -> None:
    if z.ndim != 2:
        raise ValueError(f"z must be (N, D); got {tuple(z.shape)}")
    if labels.ndim != 1 or labels.shape[0] != z.shape[0]:
        raise ValueError(f"labels must be (N,) = ({z.shape[0]},); got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids; got dtype {labels.dtype}")


def _candidate_labels(labels: Tensor, gather: bool) -> tuple[Tensor, int]:
    """Labels of the candidates (the global batch when gathering) and this rank's row offset."""
    if gather and dist.world_size() > 1:
        return dist.gather_no_grad(labels), dist.rank() * labels.shape[0]
    return labels, 0


def _positive_mask(labels: Tensor, cand_labels: Tensor, offset: int) -> tuple[Tensor, Tensor]:
    """(N, M) masks: same label as the anchor but not the anchor itself; the anchor itself."""
    rows = torch.arange(labels.shape[0], device=labels.device)
    self_mask = torch.zeros(labels.shape[0], cand_labels.shape[0], dtype=torch.bool, device=labels.device)
    self_mask[rows, rows + offset] = True
    pos = (labels[:, None] == cand_labels[None, :]) & ~self_mask
    return pos, self_mask


def normalised_candidates(z: Tensor, labels: Tensor, gather: bool):
    """L2-normalised anchors and their candidates (the global batch when gathering), with masks.

    Call inside an autocast-disabled region. Returns (z (N, D) float32 normalised, labels (N,),
    cand (M, D) gathered with gradient, cand_labels (M,), pos (N, M) same class but not self,
    self_mask (N, M)); M = world_size * N when gathered, else N.
    """
    _check_labels(z, labels)
    z = F.normalize(z.float(), dim=1)
    labels = labels.to(z.device)
    cand_labels, offset = _candidate_labels(labels, gather)
    cand = dist.gather_with_grad(z) if gather and dist.world_size() > 1 else z
    pos, self_mask = _positive_mask(labels, cand_labels, offset)
    return z, labels, cand, cand_labels, pos, self_mask
