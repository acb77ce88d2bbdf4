"""Every training method, beside their base class: self-supervised (PRETRAIN_METHODS) and supervised
objectives (SUPCON_LOSSES), each registered by name in finegrain.registry.

Importing this package imports every module in it, so a new method is one new file here (plus its
loss in finegrain/losses/ and its option as a config field); no stage names a method.
"""

import importlib
import pkgutil

from finegrain.methods import simclr, moco, byol, simsiam, supervised  # noqa: F401, I001  (built-ins first: help order)
from finegrain.methods.base import (TRAIN_LAYERS, BackboneMethod, batchnorm_layers, embed_views, freeze_bn_for,
                                   interpolate_weights, train_only)
from finegrain.methods.supervised import SupervisedMethod

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["TRAIN_LAYERS", "BackboneMethod", "SupervisedMethod", "batchnorm_layers", "embed_views", "freeze_bn_for",
           "interpolate_weights", "train_only"]
