"""Cross-entropy over the labelled rows of a batch that also holds unlabelled ones (label -1)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def labelled_cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy over the rows whose label is >= 0; rows labelled -1 are ignored.

    Computed in float32. The batch must hold at least one labelled row (the result is NaN otherwise;
    a supcon batch always holds its labelled images).

    Args:
        logits: (N, C) class scores.
        labels: (N,) class ids in [0, C), or -1.
        label_smoothing: in [0, 1).

    Returns:
        Scalar float32 tensor, in nats.
    """
    return F.cross_entropy(logits.float(), labels, ignore_index=-1, label_smoothing=label_smoothing)
