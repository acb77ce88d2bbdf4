"""Momentum (EMA) encoders: the MoCo key encoder and the BYOL target network.

The target is a frozen copy of the online network that follows it slowly:
    target <- m * target + (1 - m) * online        (parameters, after each optimiser step)
    target buffers <- online buffers               (BatchNorm running statistics, counters)
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters do not require grad (updated by `ema_update` only)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """In place: target params = momentum * target + (1 - momentum) * online; buffers copied.

    Args:
        target: the momentum copy (same structure as `online`).
        online: the network being trained.
        momentum: m in [0, 1]; 1 keeps the target fixed, 0 copies the online network.

    Raises:
        ValueError: momentum outside [0, 1], or the two modules' parameter/buffer names differ
            (e.g. one wrapped in DistributedDataParallel: pass `ddp.module`).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    for kind, t_items, o_items in (
        ("parameter", list(target.named_parameters()), list(online.named_parameters())),
        ("buffer", list(target.named_buffers()), list(online.named_buffers())),
    ):
        if [n for n, _ in t_items] != [n for n, _ in o_items]:
            raise ValueError(f"ema_update: target and online modules have different {kind} names")
        for (_, t), (_, o) in zip(t_items, o_items):
            if kind == "parameter":
                t.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)
            else:
                t.copy_(o)


def cosine_momentum(step: int, total_steps: int, base: float = 0.99, final: float = 1.0) -> float:
    """BYOL's momentum schedule: `base` at step 0 rising along a half cosine to `final` at `total_steps`.

        m(step) = final - (final - base) * (cos(pi * step / total_steps) + 1) / 2

    Steps outside [0, total_steps] are clamped to it.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
