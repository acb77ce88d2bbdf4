"""Losses: pure functions of embeddings (and labels), chosen by name.

Adding a loss is one file here and one line in ``LOSSES``.
"""

from __future__ import annotations

from typing import Callable

from finegrain.losses.contrastive import contrastive
from finegrain.losses.info_nce import info_nce, update_queue
from finegrain.losses.nt_xent import nt_xent
from finegrain.losses.supcon import supcon, supcon_anchors_without_positive
from finegrain.losses.triplet import batch_hard_triplet

LOSSES: dict[str, Callable[..., object]] = {
    "nt_xent": nt_xent,
    "info_nce": info_nce,
    "supcon": supcon,
    "batch_hard_triplet": batch_hard_triplet,
    "contrastive": contrastive,
}


def get_loss(name: str) -> Callable[..., object]:
    """The loss function registered as ``name``; ValueError listing the known names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        known = ", ".join(sorted(LOSSES))
        raise ValueError(f"unknown loss {name!r}; known losses: {known}") from None


__all__ = [
    "LOSSES",
    "batch_hard_triplet",
    "contrastive",
    "get_loss",
    "info_nce",
    "nt_xent",
    "supcon",
    "supcon_anchors_without_positive",
    "update_queue",
]
