"""One dataclass per stage; the CLI and pipeline files fill them, artifacts store them as YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from finegrain.errors import FinegrainError


@dataclass
class TrainConfig:
    """Options shared by the training stages (pretrain, supcon). Sizes in pixels.

    `lr` is used as given; None means the method's base rate scaled by batch_size / 256.
    """

    manifest: str = ""
    out: str = ""
    root: str | None = None
    backbone: str = "tf_efficientnet_lite0"
    weights: str | None = None  # FILE, "builtin", "none"; None = builtin offline weights when the backbone has them
    pretrained: bool = False  # timm hub weights (needs internet)
    image_size: int = 224
    batch_size: int = 64
    epochs: int = 10
    max_steps: int | None = None
    lr: float | None = None
    optimizer: str = "sgd"  # any timm optimizer name: sgd, adamw, lars, ...
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    accumulate: int = 1
    amp: str = "auto"  # auto (bf16/fp16 on CUDA, off on CPU), off, bf16, fp16
    channels_last: bool = False
    sync_bn: bool = True  # SyncBatchNorm under torchrun on CUDA
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    cache_images: bool = True
    cache_dir: str | None = None
    checkpoint_every: int = 0  # steps; 0 = only at the end of each epoch
    log_every: int = 10  # steps between metric lines
    resume: bool = False
    knn_monitor: bool = True
    wandb: str = "offline"
    wandb_project: str = "finegrain"
    wandb_entity: str | None = None
    wandb_tags: list[str] = field(default_factory=list)
    on_bad_image: str = "error"

    def to_dict(self) -> dict:
        """Plain dict of every field (for YAML, W&B and artifact.json)."""
        return dataclasses.asdict(self)


@dataclass
class PretrainConfig(TrainConfig):
    """`finegrain pretrain`: self-supervised contrastive pretraining (labels ignored)."""

    method: str = "simclr"  # simclr | moco
    temperature: float | None = None  # None: 0.5 for simclr, 0.2 for moco
    proj_dim: int = 128
    proj_hidden: int = 0  # 0: the backbone's embedding size
    views: str = "simclr"  # view recipe name (finegrain.data.views.RECIPES)
    queue_size: int = 4096  # moco
    moco_momentum: float = 0.99  # moco: EMA of the key encoder, raised to 1.0 on a cosine schedule


def config_from_dict(cls, values: dict):
    """Build a config dataclass from a dict, refusing unknown keys with the list of known ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise FinegrainError(f"unknown option(s) for {cls.__name__}: {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**values)
