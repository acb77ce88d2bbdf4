"""The base of every trainable method (pretrain and supcon): a backbone, its BatchNorm optionally frozen.

A method is an nn.Module the engine trains. What the engine calls:
- `forward(views, labels) -> (loss, metrics)`: views a list of V tensors (B, 3, S, S), labels (B,)
  int (-1 = unlabelled); loss a scalar tensor, metrics a dict of scalar tensors to log;
- `after_step(step, total_steps)` after each optimizer step (momentum updates, queues);
- `find_unused_parameters`: DDP must expect parameters outside the graph on some steps.
What the stages call: `Method(backbone, cfg.method_options(), **context)`, `embed(images)`, `artifact_state()`.
A method's own options are the `Options` dataclass in its class (finegrain.config.MethodOptions); the ones
several methods share are declared here once.

Frozen BatchNorm keeps the loaded running statistics and affine parameters: those layers run in
eval mode through every `train()` call and their parameters get no gradient (on small sets of
augmented views that is what keeps ImageNet features intact; benchmarks/README.md). Momentum copies
made after freezing (MoCo's key encoder, BYOL's target) inherit it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from finegrain.config import TRAIN_LAYERS, MethodOptions, at_least, between, option

log = logging.getLogger("finegrain")

# Attributes whose BatchNorm layers are held in eval mode when freeze_bn is on: the backbone and
# its momentum copies. Looked up by name, so SyncBatchNorm conversion (which swaps the modules) keeps it.
FROZEN_BN_ROOTS = ("backbone", "key_backbone", "target_backbone")


@dataclass
class ProjectionOptions(MethodOptions):
    """A projection head on the backbone's pooled features."""

    proj_dim: int = option(128, "Projection head output size.", check=at_least(1))
    proj_hidden: int = option(0, "Projection head hidden size (0: the backbone's embedding size).", check=at_least(0))


@dataclass
class HardNegativeOptions(MethodOptions):
    """Hard-negative weighting of a contrastive loss's negatives."""

    hard_negative_beta: float = option(0.0, "Weight negatives by exp(beta x cosine similarity), harder ones more "
                                            "(Robinson et al. 2021); 0 is the plain loss.", check=at_least(0))


@dataclass
class MomentumOptions(MethodOptions):
    """A momentum (EMA) copy of the online network."""

    moco_momentum: float = option(0.99, "Starting EMA momentum of the key/target network (rises to 1 on a cosine).",
                                  check=between(0, 1))


def batchnorm_layers(module: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer (1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d) inside `module`."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def embed_views(backbone: nn.Module, views) -> torch.Tensor:
    """Pooled features of V views, one backbone pass per view: [(B, 3, S, S)] * V -> (V * B, D), view-major.

    The same rows as `backbone(torch.cat(views))`, but BatchNorm (in train mode) normalises each view
    on its own, as lightly and most SimCLR reimplementations do (on CPU also the faster of the two:
    benchmarks/README.md).
    """
    return torch.cat([backbone(v) for v in views])


@torch.no_grad()
def interpolate_weights(module: nn.Module, start: dict[str, torch.Tensor], alpha: float) -> None:
    """WiSE-FT: every floating-point tensor of `module` <- (1 - alpha) x start + alpha x itself, in place.

    start: `module`'s state_dict before fine-tuning (same keys). Integer buffers (BatchNorm's counter) stay.
    """
    for name, value in module.state_dict().items():
        if value.is_floating_point():
            value.copy_(torch.lerp(start[name].to(value.device, value.dtype), value, alpha))


def train_only(backbone: nn.Module, layers: str) -> int:
    """Leave gradients on only `layers` of the backbone; returns how many parameter tensors still train.

    layers: "all" (no change); "bn": the BatchNorm affine parameters only (HPT's BN-only variant,
    Reed et al. 2021; statistics stay as --freeze-bn says); "last": the last two block groups of
    timm's coarse grouping (the last stage and what follows it), as --freeze-bn left them.
    """
    if layers not in TRAIN_LAYERS:
        raise ValueError(f"layers must be one of {TRAIN_LAYERS}, got {layers!r}")
    if layers == "bn":
        bn_params = {id(p) for bn in batchnorm_layers(backbone) for p in bn.parameters()}
        for p in backbone.parameters():
            p.requires_grad_(id(p) in bn_params)
    elif layers == "last":
        from timm.models import group_parameters

        groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
        keep = {name for gid in sorted(groups)[-2:] for name in groups[gid]}
        for name, p in backbone.named_parameters():
            if name not in keep:
                p.requires_grad_(False)
    return sum(p.requires_grad for p in backbone.parameters())


def freeze_bn_for(freeze_bn: bool, weights_source: str) -> bool:
    """Whether to freeze the backbone's BatchNorm: `freeze_bn`, except for random initial weights.

    A randomly initialised backbone has no statistics worth keeping (and frozen identity BatchNorm
    would leave it unnormalised), so freeze_bn is dropped there with a log line.
    """
    if freeze_bn and weights_source == "none":
        log.info("BatchNorm trains normally: random initial weights have no statistics to keep (--freeze-bn ignored)")
        return False
    return freeze_bn


class BackboneMethod(nn.Module):
    """nn.Module holding `self.backbone` (timm, pooled features); subclasses add heads and a forward.

    Class attributes a method sets:
        Options: its own options, a MethodOptions dataclass (flags and pipeline keys of the same names);
            setting another method's option is refused.
        base_lr: SGD learning rate per 256 images when --lr is not given.

    Args:
        backbone: timm model giving pooled features (B, D).
        options: an `Options` instance (default: every option at its default); kept as `self.options`.
        freeze_bn: freeze the backbone's BatchNorm layers (statistics and affine parameters) as loaded.
    """

    Options = MethodOptions
    base_lr: float = 0.05
    find_unused_parameters: bool = False
    accuracy_chance: float | None = None  # chance level of the "accuracy" metric forward() reports, if any

    def __init__(self, backbone: nn.Module, options: MethodOptions | None = None, *, freeze_bn: bool = False):
        super().__init__()
        self.options = self.Options() if options is None else options
        self.backbone = backbone
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for bn in batchnorm_layers(backbone):
                for p in bn.parameters():
                    p.requires_grad_(False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D) pooled backbone features (what evaluation, predict and later stages use)."""
        return self.backbone(images)

    def after_step(self, step: int, total_steps: int) -> None:
        """Called by the engine after each optimizer step (momentum updates, queues); default: nothing."""

    def artifact_state(self) -> dict[str, torch.Tensor]:
        """The weights a stage artifact keeps: "backbone.*" and "head.*" (momentum copies and queues are not kept)."""
        state = {f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}
        state.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return state

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
