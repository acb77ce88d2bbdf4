"""Backbones (timm factory and offline weight sources), projection/prediction heads, momentum encoders.

Imports only torch, timm, safetensors and `finegrain.errors`: never data, engine, stages or CLI.
The backbone factory (and with it timm, about 2 s to import) loads on first use, so the heads and
momentum copies the methods need do not pull timm into every `finegrain` command.
"""

import importlib

from finegrain.models.heads import PredictionHead, ProjectionHead
from finegrain.models.momentum import cosine_momentum, ema_update, momentum_copy

_LAZY = {name: "finegrain.models.backbone" for name in ("create_backbone", "data_config", "embedding_dim",
                                                         "offline_backbones", "build_backbone")}
_LAZY.update({name: "finegrain.models.weights" for name in ("BUILTIN_WEIGHTS", "WeightsError", "builtin_state_dict",
                                                             "load_state_dict_file", "load_weights_into")})


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finegrain.models' has no attribute {name!r}")


__all__ = [
    "BUILTIN_WEIGHTS",
    "PredictionHead",
    "ProjectionHead",
    "WeightsError",
    "build_backbone",
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
