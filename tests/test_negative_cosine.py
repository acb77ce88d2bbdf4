"""The BYOL / SimSiam loss against lightly's NegativeCosineSimilarity and BYOL's own formula."""

from __future__ import annotations

import pytest
import torch
from lightly.loss import NegativeCosineSimilarity

from finegrain.losses.negative_cosine import negative_cosine
from finegrain.methods.byol import BYOL
from finegrain.methods.simsiam import SimSiam


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_lightly_and_byol_formula(seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(6, 16, generator=g, requires_grad=True)
    z = torch.randn(6, 16, generator=g)
    ours = negative_cosine(p, z)
    theirs = NegativeCosineSimilarity()(p, z.detach())
    assert torch.allclose(ours, theirs, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, p)
    (g_theirs,) = torch.autograd.grad(NegativeCosineSimilarity()(p, z.detach()), p)
    assert torch.allclose(g_ours, g_theirs, atol=1e-6)
    # BYOL: mean ||p/|p| - z/|z| ||^2 = 2 - 2 cos = 2 + 2 D
    byol = ((p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(1).mean()
    assert torch.allclose(byol, 2 + 2 * ours, atol=1e-5)


def test_stop_gradient_and_edge_cases():
    p = torch.randn(4, 8, requires_grad=True)
    z = torch.randn(4, 8, requires_grad=True)
    negative_cosine(p, z).backward()
    assert p.grad is not None and z.grad is None, "no gradient may flow into the target"
    assert negative_cosine(z.detach(), z.detach()).item() == pytest.approx(-1.0)
    zero = negative_cosine(torch.zeros(2, 8, requires_grad=True), torch.randn(2, 8))
    assert torch.isfinite(zero) and zero.item() == 0.0
    with pytest.raises(ValueError):
        negative_cosine(torch.randn(3, 8), torch.randn(4, 8))


class _Tiny(torch.nn.Module):
    num_features = 8

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 8))

    def forward(self, x):
        return self.net(x)


def test_byol_target_gets_no_gradient_and_follows_by_ema():
    torch.manual_seed(0)
    byol = BYOL(_Tiny(), BYOL.Options(proj_dim=4, proj_hidden=8, moco_momentum=0.9))
    views = [torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)]
    loss, _ = byol(views)
    loss.backward()
    assert all(p.grad is None for p in byol.target_backbone.parameters())
    assert all(p.grad is not None for p in byol.predictor.parameters())
    before = byol.target_backbone.net[1].weight.clone()
    with torch.no_grad():
        byol.backbone.net[1].weight.add_(1.0)
    byol.after_step(0, 10)  # momentum 0.9 at step 0
    expected = 0.9 * before + 0.1 * byol.backbone.net[1].weight
    assert torch.allclose(byol.target_backbone.net[1].weight, expected, atol=1e-6)


def test_simsiam_has_no_momentum_network_and_a_bottleneck_predictor():
    simsiam = SimSiam(_Tiny(), SimSiam.Options(proj_dim=16, proj_hidden=8))
    assert simsiam.predictor.hidden_dim == 4 and not hasattr(simsiam, "target_backbone")
    loss, _ = simsiam([torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)])
    assert -1.0 <= loss.item() <= 1.0
