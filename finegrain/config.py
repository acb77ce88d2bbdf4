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
    channels_last: bool = True  # NHWC: 1.3-1.6x faster train step on CPU here (benchmarks/README.md)
    compile: bool = False  # torch.compile the train step (see benchmarks/README.md for when it pays)
    sync_bn: bool = True  # SyncBatchNorm under torchrun on CUDA
    freeze_bn: bool = True  # backbone BatchNorm statistics and affine parameters kept as loaded (not for random init)
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

    method: str = "simclr"  # simclr | moco | byol | simsiam
    temperature: float | None = None  # None: 0.5 for simclr, 0.2 for moco
    proj_dim: int = 128
    proj_hidden: int = 0  # 0: the backbone's embedding size
    views: str = "simclr"  # view recipe name (finegrain.data.views.RECIPES)
    queue_size: int = 4096  # moco
    hard_negative_beta: float = 0.0  # simclr, moco: re-weight negatives by exp(beta x similarity); 0 = plain loss
    moco_momentum: float = 0.99  # moco, byol: EMA of the key/target network, raised to 1.0 on a cosine schedule


@dataclass
class SupconConfig(TrainConfig):
    """`finegrain supcon`: supervised (contrastive) fine-tuning on the labelled train images.

    The defaults are a gentle fine-tuning recipe for small fine-grained sets: BatchNorm frozen,
    the backbone at 0.1x the head's learning rate, one head-only warm-up epoch, crop + flip views
    (colour is a species cue) and P x K class-balanced batches (16 classes x 4 images).
    """

    from_artifact: str | None = None  # a pretrain (or any) artifact folder to start from
    loss: str = "supcon"  # supcon | triplet | contrastive | ce | supcon_ce
    temperature: float = 0.1  # supcon
    margin: float = 0.2  # triplet
    neg_margin: float = 0.5  # contrastive: different-class pairs are pushed at least this far apart (L2, unit sphere)
    label_smoothing: float = 0.1  # ce, supcon_ce
    ce_weight: float = 1.0  # supcon_ce: loss = supcon + ce_weight x cross-entropy
    proj_dim: int = 128
    proj_hidden: int = 0  # 0: the backbone's embedding size
    views: str = "supcon"
    n_views: int = 2
    sampler: str = "pk"  # pk (P classes x K images per batch) | random
    classes_per_batch: int = 16  # P; K = batch_size / P
    backbone_lr_scale: float = 0.1  # backbone learning rate = lr x this
    layer_decay: float | None = None  # timm layer-wise decay of the backbone rate (e.g. 0.75)
    head_warmup_epochs: float = 1.0  # train only the head first (LP-FT)
    classifier: bool = True  # fit a linear classifier on the embedding after training


@dataclass
class EvaluateConfig:
    """`finegrain evaluate`: kNN, linear probe, retrieval and a report, for an artifact or a bare backbone."""

    manifest: str = ""
    out: str = ""
    root: str | None = None
    from_artifact: str | None = None
    backbone: str = "tf_efficientnet_lite0"  # used without --from
    weights: str | None = None  # used without --from: FILE, builtin, none
    pretrained: bool = False
    image_size: int | None = None  # None: the artifact's training size (224 for a bare backbone)
    bbox_crop: bool = False  # crop test and train images to their boxes when the manifest has them
    batch_size: int = 128
    knn_k: int = 20
    knn_t: float = 0.07
    linear: bool = True
    retrieval_split: str = "test"
    embedding_map: bool = True
    device: str = "auto"
    amp: str = "auto"
    workers: int = 2
    cache_images: bool = True
    cache_dir: str | None = None
    seed: int = 0
    on_bad_image: str = "error"
    wandb: str = "offline"
    wandb_project: str = "finegrain"
    wandb_entity: str | None = None
    wandb_tags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain dict of every field."""
        return dataclasses.asdict(self)


def config_from_dict(cls, values: dict):
    """Build a config dataclass from a dict, refusing unknown keys with the list of known ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise FinegrainError(f"unknown option(s) for {cls.__name__}: {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**values)
