"""The base of every trainable method (pretrain and supcon): a backbone, optionally with BatchNorm frozen.

Frozen BatchNorm keeps the loaded running statistics and affine parameters: those layers run in
eval mode through every `train()` call and their parameters get no gradient. On small sets of
augmented views this is what keeps ImageNet features intact: on cub50, 44 MoCo steps that moved
the weights by 0.1% dropped kNN top-1 from 0.86 to 0.69, and putting the ImageNet running
statistics back restored 0.86 (benchmarks/README.md). Momentum copies made after freezing (MoCo's
key encoder, BYOL's target) inherit it: their BatchNorm layers are held in eval mode too.
"""

from __future__ import annotations

import torch
from torch import nn

# Attributes whose BatchNorm layers are held in eval mode when freeze_bn is on: the backbone and
# its momentum copies. Looked up by name, so SyncBatchNorm conversion (which swaps the modules) keeps it.
FROZEN_BN_ROOTS = ("backbone", "key_backbone", "target_backbone")


def batchnorm_layers(module: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer (1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d) inside `module`."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class BackboneMethod(nn.Module):
    """nn.Module holding `self.backbone` (timm, pooled features); subclasses add heads and a forward.

    Args:
        backbone: timm model giving pooled features (B, D).
        freeze_bn: freeze the backbone's BatchNorm layers (statistics and affine parameters) as loaded.
    """

    def __init__(self, backbone: nn.Module, *, freeze_bn: bool = False):
        super().__init__()
        self.backbone = backbone
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for bn in batchnorm_layers(backbone):
                for p in bn.parameters():
                    p.requires_grad_(False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D) pooled backbone features (what evaluation, predict and later stages use)."""
        return self.backbone(images)

    # The engine's hooks. DDP: parameters outside the graph on some steps (e.g. a head-only warm-up).
    find_unused_parameters: bool = False

    def after_step(self, step: int, total_steps: int) -> None:
        """Called by the engine after each optimizer step (momentum updates, queues); default: nothing."""

    def train(self, mode: bool = True):
        """Train mode, except frozen BatchNorm layers (backbone and momentum copies), which stay in eval mode."""
        super().train(mode)
        if self.freeze_bn:
            for name in FROZEN_BN_ROOTS:
                root = getattr(self, name, None)
                if root is not None:
                    for bn in batchnorm_layers(root):
                        bn.eval()
        return self
