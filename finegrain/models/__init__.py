"""Backbones (timm factory and offline weight sources), projection/prediction heads, momentum encoders.

Imports only torch, timm, safetensors and `finegrain.errors`: never data, engine, stages or CLI.
"""

from finegrain.models.backbone import create_backbone, data_config, embedding_dim, offline_backbones
from finegrain.models.heads import PredictionHead, ProjectionHead
from finegrain.models.momentum import cosine_momentum, ema_update, momentum_copy
from finegrain.models.weights import (
    BUILTIN_WEIGHTS,
    WeightsError,
    builtin_state_dict,
    load_state_dict_file,
    load_weights_into,
)

__all__ = [
    "BUILTIN_WEIGHTS",
    "PredictionHead",
    "ProjectionHead",
    "WeightsError",
    "builtin_state_dict",
    "cosine_momentum",
    "create_backbone",
    "data_config",
    "ema_update",
    "embedding_dim",
    "load_state_dict_file",
    "load_weights_into",
    "momentum_copy",
    "offline_backbones",
]
