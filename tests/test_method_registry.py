"""A new method added through the registry alone runs end to end: a method, a loss and a config field, no stage edited.

The three pieces a contributor writes live in this file: `centroid_loss` (would be losses/centroid.py),
`Centroid` (would be methods/centroid.py) and `CentroidConfig.pull` (would be one field of PretrainConfig).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from finegrain.config import POSITIVE, ConfigError, EvaluateConfig, PretrainConfig, option
from finegrain.methods import BackboneMethod, embed_views
from finegrain.models.heads import ProjectionHead
from finegrain.registry import PRETRAIN_METHODS
from finegrain.stages.evaluate import run_evaluate
from finegrain.stages.pretrain import run_pretrain


def centroid_loss(z1: torch.Tensor, z2: torch.Tensor, pull: float) -> torch.Tensor:
    """(B, D), (B, D) -> scalar: pull each pair's unit embeddings together, push the batch centroid towards 0."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    return pull * (z1 - z2).pow(2).sum(1).mean() + torch.cat([z1, z2]).mean(0).pow(2).sum()


class Centroid(BackboneMethod):
    """A toy method for this test: pair pull plus centroid push."""

    options = ("proj_dim", "pull")
    base_lr = 0.05

    def __init__(self, backbone, *, proj_dim: int = 128, pull: float = 1.0, freeze_bn: bool = False):
        super().__init__(backbone, freeze_bn=freeze_bn)
        self.head = ProjectionHead(backbone.num_features, backbone.num_features, proj_dim)
        self.pull = pull

    def forward(self, views, labels=None):
        z1, z2 = self.head(embed_views(self.backbone, views[:2])).chunk(2)
        return centroid_loss(z1, z2, self.pull), {}


@dataclass
class CentroidConfig(PretrainConfig):
    pull: float = option(1.0, "Centroid: weight of the pair term.", check=POSITIVE, method_option=True)


@pytest.fixture
def centroid_registered():
    PRETRAIN_METHODS.add("centroid", Centroid)
    yield
    PRETRAIN_METHODS.remove("centroid")


def test_a_method_added_through_the_registry_trains_and_evaluates(birds, tmp_path, centroid_registered):
    common = dict(manifest=str(birds.root / "manifest.csv"), backbone="test_efficientnet", weights="none",
                  image_size=32, workers=0, wandb="disabled", cache_dir=str(tmp_path / "cache"))
    cfg = CentroidConfig(out=str(tmp_path / "pre"), method="centroid", pull=2.0, proj_dim=16, batch_size=8, epochs=2,
                         lr=1e-3, optimizer="adamw", log_every=1, **common)
    art = run_pretrain(cfg)
    assert art.info["method"] == "centroid" and art.info["metrics"]["steps"] > 0
    assert art.config()["pull"] == 2.0 and art.config()["resolved_lr"] == 1e-3
    keys = load_file(art.path / "model.safetensors").keys()
    assert any(k.startswith("backbone.") for k in keys) and any(k.startswith("head.") for k in keys)

    report = run_evaluate(EvaluateConfig(out=str(tmp_path / "eval"), from_artifact=str(art.path), **common))
    assert 0.0 <= report.info["metrics"]["knn_top1"] <= 1.0

    # Its option is checked like any other, and the other methods refuse it.
    with pytest.raises(ConfigError, match="^pull: must be greater than 0"):
        CentroidConfig(method="centroid", pull=0.0)
    with pytest.raises(ConfigError, match="^pull: --method simclr does not use"):
        CentroidConfig(method="simclr", pull=3.0)
    with pytest.raises(ConfigError, match="^queue_size: --method centroid does not use"):
        CentroidConfig(method="centroid", queue_size=16)
