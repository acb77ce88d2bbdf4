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
        """From cfg.from_artifact (a pretrain or supcon artifact, or an evaluate folder: the model it evaluated, at
        the evaluation's image side) or, without one, the bare cfg.backbone with cfg.weights (a config without
        backbone options needs from_artifact). cfg.image_size overrides the image side (px)."""
        self.artifact: Artifact | None = None
        image_size, bare = cfg.image_size, None
        artifact = load_artifact(cfg.from_artifact) if cfg.from_artifact else None
        if artifact is not None and artifact.info.get("stage") == "evaluate":
            image_size = image_size or artifact.info["image_size"]
            artifact, bare = _evaluated(artifact)
        elif artifact is None:
            bare = (cfg.backbone, cfg.weights, cfg.pretrained)
        if artifact is not None:
            self.artifact, info = artifact, artifact.info
            self.model = create_backbone(info["backbone"], weights=artifact.path)
            self.name = info["backbone"]
            self.image_size = image_size or test_size(info["image_size"])
            self.mean, self.std = info["mean"], info["std"]
            self.source = f"{info['stage']} artifact {artifact.path}"
            self.weights_source = f"artifact:{artifact.path}"  # as a training stage records its start
        else:
            backbone, weights, pretrained = bare
            self.model, source = build_backbone(backbone, weights=weights, pretrained=pretrained)
            dc = data_config(self.model)
            self.name, self.image_size = backbone, image_size or 224
            self.mean, self.std = dc["mean"], dc["std"]
            self.source = f"{backbone} ({source} weights)"
            self.weights_source = source  # builtin, none, timm-hub or a file, as build_backbone names it
        self.model.eval()
        self.identity = weights_hash(self.name, self.model)


def _evaluated(evaluation: Artifact) -> tuple[Artifact | None, tuple | None]:
    """What an evaluate folder evaluated: (its artifact, None), or (None, (backbone, weights, pretrained)) for a
    bare backbone."""
    parent = (evaluation.info.get("parent") or {}).get("path")
    if parent:
        return load_artifact(parent), None
    config = evaluation.config()
    if not config.get("backbone"):
        raise FinegrainError(f"{evaluation.path} is an evaluation that records no backbone; pass the artifact it "
                             "evaluated")
    return None, (config["backbone"], config.get("weights"), bool(config.get("pretrained")))


def weights_hash(name: str, model: torch.nn.Module) -> str:
    """sha256 hex digest of a backbone's name and every tensor of its state dict (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256(name.encode())
    for key, tensor in model.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()
