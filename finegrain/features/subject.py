"""What features are read with: a backbone in eval mode, its preprocessing and the hash of its weights."""

from __future__ import annotations

import hashlib

import torch

from finegrain.artifacts import Artifact, load_artifact
from finegrain.config import FeatureConfig
from finegrain.errors import FinegrainError
from finegrain.features.extract import test_size
from finegrain.models.backbone import build_backbone, create_backbone, data_config


class Subject:
    """A backbone in eval mode, its image side (px), mean and std, and `identity`: the hash of its weights.

    The identity depends on the weights alone, not on where they came from: the same artifact copied
    elsewhere, or the same starting weights under another command, share cached features.
    """

    def __init__(self, cfg: FeatureConfig):
        self.artifact: Artifact | None = None
        if cfg.from_artifact:
            self.artifact = load_artifact(cfg.from_artifact)
            info = self.artifact.info
            if info.get("stage") == "evaluate":
                raise FinegrainError(f"{cfg.from_artifact} is an evaluation; pass the pretrain or supcon artifact it evaluated")
            self.model = create_backbone(info["backbone"], weights=self.artifact.path)
            self.name = info["backbone"]
            self.image_size = cfg.image_size or test_size(info["image_size"])
            self.mean, self.std = info["mean"], info["std"]
            self.source = f"{info['stage']} artifact {self.artifact.path}"
            self.weights_source = f"artifact:{self.artifact.path}"  # as a training stage records its start
        else:
            self.model, weights = build_backbone(cfg.backbone, weights=cfg.weights, pretrained=cfg.pretrained)
            dc = data_config(self.model)
            self.name = cfg.backbone
            self.image_size = cfg.image_size or 224
            self.mean, self.std = dc["mean"], dc["std"]
            self.source = f"{cfg.backbone} ({weights} weights)"
            self.weights_source = weights  # builtin, none, timm-hub or a file, as build_backbone names it
        self.model.eval()
        self.identity = weights_hash(self.name, self.model)


def weights_hash(name: str, model: torch.nn.Module) -> str:
    """sha256 hex digest of a backbone's name and every tensor of its state dict (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256(name.encode())
    for key, tensor in model.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()
