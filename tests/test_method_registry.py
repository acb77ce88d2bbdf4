"""A new method added through the registry alone runs end to end: a method with its options and a loss, no
config, stage or command-line code edited.

In-process: `centroid_loss` (would be losses/centroid.py) and `Centroid` (would be methods/centroid.py) live
in this file, with a config subclass for the option. Through the command line: the same two files written
into a copy of the package give `finegrain pretrain --method centroid --pull X`.
"""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from finegrain.artifacts import load_artifact
from finegrain.config import POSITIVE, ConfigError, EvaluateConfig, PretrainConfig, option
from finegrain.methods import BackboneMethod, embed_views
from finegrain.methods.base import ProjectionOptions
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

    @dataclass
    class Options(ProjectionOptions):
        pull: float = option(1.0, "Weight of the pair term.", check=POSITIVE)

    base_lr = 0.05

    def __init__(self, backbone, options: Options | None = None, *, freeze_bn: bool = False):
        super().__init__(backbone, options, freeze_bn=freeze_bn)
        self.head = ProjectionHead(backbone.num_features, backbone.num_features, self.options.proj_dim)

    def forward(self, views, labels=None):
        z1, z2 = self.head(embed_views(self.backbone, views[:2])).chunk(2)
        return centroid_loss(z1, z2, self.options.pull), {}


@dataclass
class CentroidConfig(PretrainConfig):
    """PretrainConfig's fields come from the options the package's methods declare; one registered in a
    test adds its field here."""

    pull: float | None = option(None, "centroid: weight of the pair term.", method_option=True)


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


# The same loss and method as above, as the two files a contributor would add to the package.
CENTROID_LOSS_HEADER = '''
"""A toy loss: pair pull plus centroid push."""

import torch
import torch.nn.functional as F

'''

CENTROID_METHOD_HEADER = '''
"""A toy method: pair pull plus centroid push."""

from __future__ import annotations

from dataclasses import dataclass

from finegrain.config import POSITIVE, option
from finegrain.losses.centroid import centroid_loss
from finegrain.methods.base import BackboneMethod, ProjectionOptions, embed_views
from finegrain.models.heads import ProjectionHead
from finegrain.registry import PRETRAIN_METHODS

'''


def test_a_method_file_adds_its_option_to_the_command_line(birds, tmp_path):
    """Two new files (method with its option, loss) in the package: `--pull` exists, reaches the method, is
    checked, and is refused for another method; help lists it without importing torch."""
    package = Path(__import__("finegrain").__file__).parent
    copy = tmp_path / "src" / "finegrain"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "losses" / "centroid.py").write_text(CENTROID_LOSS_HEADER + inspect.getsource(centroid_loss))
    (copy / "methods" / "centroid.py").write_text(
        CENTROID_METHOD_HEADER + '@PRETRAIN_METHODS.register("centroid")\n' + inspect.getsource(Centroid))

    def finegrain(*args):
        probe = ("import sys\ntry:\n    import finegrain.cli as c; c.main()\nfinally:\n"
                 "    print('HEAVY', [m for m in ('torch', 'timm', 'albumentations') if m in sys.modules])")
        return subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=600,
                              cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(copy.parent),
                                                 "COLUMNS": "200"})

    help_text = finegrain("pretrain", "--help")
    assert "--pull" in help_text.stdout and "centroid: Weight of the pair term (default 1.0)" in help_text.stdout
    assert "HEAVY []" in help_text.stdout, help_text.stdout[-300:]

    common = ["--manifest", str(birds.root / "manifest.csv"), "--backbone", "test_efficientnet", "--weights", "none",
              "--image-size", "32", "--workers", "0", "--wandb", "disabled", "--cache-dir", str(tmp_path / "cache"),
              "--batch-size", "8", "--epochs", "1", "--lr", "0.001", "--optimizer", "adamw", "--no-knn-monitor"]
    run = finegrain("pretrain", *common, "--method", "centroid", "--pull", "2.5", "--proj-dim", "16",
                    "-o", str(tmp_path / "pre"))
    assert run.returncode == 0, run.stderr[-2000:]
    config = load_artifact(tmp_path / "pre").config()
    assert config["pull"] == 2.5 and config["proj_dim"] == 16 and config["temperature"] is None

    refused = finegrain("pretrain", *common, "--method", "simclr", "--pull", "2.5", "-o", str(tmp_path / "p2"))
    assert refused.returncode == 2 and "--pull: --method simclr does not use this option" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "p2").exists()
    checked = finegrain("pretrain", *common, "--method", "centroid", "--pull", "0", "-o", str(tmp_path / "p3"))
    assert checked.returncode == 2 and "--pull: must be greater than 0" in checked.stderr
