"""Losses: pure functions of embeddings (and labels), one file each, with shapes in their docstrings.

Methods (finegrain/methods/) call them by import; the names users choose are the methods' and
objectives' registries (finegrain.registry), not the losses'.
"""

from finegrain.losses.contrastive import contrastive
from finegrain.losses.cross_entropy import labelled_cross_entropy
from finegrain.losses.distillation import soft_target_kl
from finegrain.losses.info_nce import info_nce, update_queue
from finegrain.losses.negative_cosine import negative_cosine
from finegrain.losses.nt_xent import nt_xent
from finegrain.losses.supcon import supcon, supcon_anchors_without_positive
from finegrain.losses.triplet import batch_hard_triplet

__all__ = [
    "batch_hard_triplet",
    "contrastive",
    "info_nce",
    "labelled_cross_entropy",
    "negative_cosine",
    "nt_xent",
    "soft_target_kl",
    "supcon",
    "supcon_anchors_without_positive",
    "update_queue",
]
