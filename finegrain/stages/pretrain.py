"""`finegrain pretrain`: self-supervised contrastive pretraining (SimCLR, MoCo v2) of a timm backbone.

Labels are ignored: every train and unlabeled image is used. Writes a stage artifact (see
finegrain.artifacts) whose "backbone.*" weights `supcon` and `evaluate` start from.
"""

from __future__ import annotations

import logging

from finegrain import dist
from finegrain.artifacts import Artifact, write_artifact
from finegrain.config import PretrainConfig
from finegrain.data.dataset import ManifestDataset
from finegrain.data.views import build_view, make_recipe
from finegrain.engine.loop import fit
from finegrain.errors import FinegrainError
from finegrain.stages.common import (
    TRAINING_BAD_IMAGE_POLICY, batchnorm_frozen, build_backbone, image_cache, knn_monitor, load_checked_manifest,
    prepare_out_dir, setup, stored_run_id,
)
from finegrain.stages.pretrain_methods import METHODS

log = logging.getLogger("finegrain")


def run_pretrain(cfg: PretrainConfig) -> Artifact | None:
    """Pretrain a backbone as `cfg` says and write its artifact to `cfg.out`.

    Returns the Artifact on rank 0 (None on other ranks).
    """
    if cfg.method not in METHODS:
        raise FinegrainError(f"unknown --method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    if not cfg.hard_negative_beta >= 0:
        raise FinegrainError(f"--hard-negative-beta must be 0 or more, got {cfg.hard_negative_beta}")
    from finegrain.models.backbone import data_config
    from finegrain.tracking import Tracker

    device = setup(cfg)
    out = prepare_out_dir(cfg)
    manifest = load_checked_manifest(cfg)
    train = manifest.select(["train", "unlabeled"])
    if len(train) == 0:
        raise FinegrainError(f"{cfg.manifest} has no train or unlabeled images to pretrain on")
    backbone, weights_source = build_backbone(cfg)
    data_cfg = data_config(backbone)
    method_cls = METHODS[cfg.method]
    method = method_cls(backbone, proj_dim=cfg.proj_dim, proj_hidden=cfg.proj_hidden, temperature=cfg.temperature,
                        queue_size=cfg.queue_size, moco_momentum=cfg.moco_momentum,
                        hard_negative_beta=cfg.hard_negative_beta, freeze_bn=batchnorm_frozen(cfg, weights_source))
    recipe = make_recipe(cfg.views, image_size=cfg.image_size, mean=data_cfg["mean"], std=data_cfg["std"])
    dataset = ManifestDataset(_unlabelled(train), build_view(recipe), n_views=2, on_bad_image=TRAINING_BAD_IMAGE_POLICY,
                              cache=image_cache(cfg, train, cfg.image_size), seed=cfg.seed)
    lr = cfg.lr if cfg.lr is not None else method_cls.base_lr * cfg.batch_size * cfg.accumulate * dist.world_size() / 256
    if cfg.lr is None and weights_source != "none":
        log.warning("lr %.3g is %s's base rate for training from scratch; from pretrained weights it can wreck them "
                    "(on cub50, simclr at 0.075 fell to chance kNN accuracy; 0.005 kept them): consider --lr 0.005",
                    lr, cfg.method)
    config = {"stage": "pretrain", **cfg.to_dict(), "resolved_lr": lr, "view_recipe": recipe.to_dict()}
    tracker = None
    if dist.is_main():
        tracker = Tracker(out, mode=cfg.wandb, project=cfg.wandb_project, entity=cfg.wandb_entity, tags=cfg.wandb_tags,
                          job_type="pretrain", config=config, run_id=stored_run_id(out) if cfg.resume else None)
        tracker.use_dataset(cfg.manifest, name=f"manifest-{manifest.content_hash[:12]}")
    log.info("pretrain: %s %s on %d images at %dpx, batch %d, lr %.3g, BatchNorm %s, device %s", cfg.method,
             cfg.backbone, len(train), cfg.image_size, cfg.batch_size, lr, "frozen" if method.freeze_bn else "trained",
             device)
    try:
        result = fit(method, dataset, cfg, out, device=device, base_lr=lr, tracker=tracker,
                     monitor=knn_monitor(cfg, manifest, data_cfg, device))
        if not dist.is_main():
            return None
        metrics = {"final_loss": result.last_loss, "steps": result.steps, **result.monitor}
        state = {f"backbone.{k}": v for k, v in method.backbone.state_dict().items()}
        state.update({f"head.{k}": v for k, v in method.head.state_dict().items()})
        wandb_name = f"pretrain-{cfg.method}"
        artifact = write_artifact(out, stage="pretrain", config=config, state_dict=state, info={
            "backbone": cfg.backbone, "method": cfg.method, "embedding_dim": backbone.num_features,
            "projection_dim": cfg.proj_dim, "image_size": cfg.image_size, "mean": list(data_cfg["mean"]),
            "std": list(data_cfg["std"]), "interpolation": data_cfg.get("interpolation"), "crop_pct": data_cfg.get("crop_pct"),
            "bbox_crop": False, "class_names": None, "manifest": str(cfg.manifest), "manifest_hash": manifest.content_hash,
            "parent": None, "weights_source": weights_source,
            "metrics": metrics, "wandb_run_id": tracker.run_id if tracker else None, "wandb_artifact": wandb_name,
        })
        tracker.summary(metrics)
        tracker.log_artifact(out, name=wandb_name, type="model", metadata=metrics)
        log.info("pretrain: wrote artifact %s (%s)", out, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return artifact
    finally:
        if tracker is not None:
            tracker.finish()
        dist.cleanup()


def _unlabelled(manifest):
    """The same rows with labels hidden: pretraining never sees them."""
    from finegrain.data.manifest import Manifest

    table = manifest.table.copy()
    table["label"] = ""
    table["split"] = "unlabeled"
    return Manifest(table, manifest.root)

