"""Small MLP heads put on top of a backbone's pooled features (never inside the backbone).

- `ProjectionHead`: SimCLR / MoCo v2 / SupCon projection g(h), where the contrastive loss is taken;
  evaluation uses the backbone features h before it.
- `PredictionHead`: BYOL / SimSiam predictor q(z) on the online branch only.
- `CosineClassifier`: class scores as scaled cosine similarities (NormSoftmax), for cross-entropy.

Each maps (B, D_in) -> (B, D_out). With `batch_norm=True` the MLPs need B >= 2 in train mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _mlp(dims: list[int], batch_norm: bool) -> nn.Sequential:
    """Linear layers through `dims`, with [BatchNorm1d] + ReLU after every layer but the last."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        # A bias right before BatchNorm is cancelled by its mean subtraction: leave it out.
        layers.append(nn.Linear(d_in, d_out, bias=last or not batch_norm))
        if not last:
            if batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ProjectionHead(nn.Module):
    """MLP projection head: in_dim -> hidden_dim (x num_layers - 1) -> out_dim.

    Linear, [BatchNorm1d], ReLU between layers and a plain Linear at the end, as in SimCLR
    (batch_norm=True) and MoCo v2 (batch_norm=False).

    Args:
        in_dim: input size, the backbone's `num_features`.
        hidden_dim: width of the hidden layers; defaults to `in_dim`.
        out_dim: output (embedding) size, 128 in SimCLR / MoCo / SupCon.
        num_layers: number of Linear layers, >= 1 (1 is a plain linear projection).
        batch_norm: BatchNorm1d after each hidden Linear.

    Shapes:
        (B, in_dim) -> (B, out_dim).
    """

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int = 128, *,
                 num_layers: int = 2, batch_norm: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        hidden_dim = in_dim if hidden_dim is None else hidden_dim
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        self.net = _mlp([in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim], batch_norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PredictionHead(nn.Module):
    """BYOL / SimSiam predictor: dim -> hidden_dim -> dim, with [BatchNorm1d] + ReLU in between.

    Args:
        dim: size of the projections it predicts (the projection head's `out_dim`).
        hidden_dim: bottleneck width; defaults to `max(1, dim // 4)` as in SimSiam (2048 -> 512).
        batch_norm: BatchNorm1d after the hidden Linear (both papers use it).

    Shapes:
        (B, dim) -> (B, dim).
    """

    def __init__(self, dim: int, hidden_dim: int | None = None, *, batch_norm: bool = True):
        super().__init__()
        hidden_dim = max(1, dim // 4) if hidden_dim is None else hidden_dim
        self.dim, self.hidden_dim = dim, hidden_dim
        self.net = _mlp([dim, hidden_dim, dim], batch_norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CosineClassifier(nn.Module):
    """Class scores as cosine similarities between features and class weights, divided by a temperature.

    logits = normalize(x) @ normalize(W).T / temperature (NormSoftmax, Zhai & Wu 2019; CosFace without
    the margin). Unlike a plain Linear on raw features, whose stable SGD learning rate shrinks with
    the squared feature norm (pooled timm features have norms of 10-30), its gradients do not grow
    with the feature scale.

    Args:
        in_dim: feature size.
        num_classes: number of classes.
        temperature: logits lie in [-1 / temperature, 1 / temperature].

    Shapes:
        (B, in_dim) -> (B, num_classes).
    """

    def __init__(self, in_dim: int, num_classes: int, temperature: float = 0.05):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.weight = nn.Parameter(torch.randn(num_classes, in_dim) / in_dim ** 0.5)
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).T / self.temperature
