"""`finegrain pretrain`: self-supervised pretraining of a timm backbone (any method in PRETRAIN_METHODS).

Labels are ignored: every train and unlabeled image is used. Writes a stage artifact (see
finegrain.artifacts) whose "backbone.*" weights `supcon` and `evaluate` start from.
"""

from __future__ import annotations

import dataclasses

import logging

from finegrain.artifacts import Artifact
from finegrain.config import PretrainConfig
from finegrain.data.dataset import TRAINING_BAD_IMAGE_POLICY, ManifestDataset, image_cache
from finegrain.data.manifest import Manifest
from finegrain.data.views import build_view, make_recipe
from finegrain.errors import FinegrainError
from finegrain.methods import freeze_bn_for, train_only
from finegrain.models.backbone import build_backbone, data_config
from finegrain.registry import PRETRAIN_METHODS
from finegrain.stages.skeleton import lr_for, model_info, stage_run

log = logging.getLogger("finegrain")


def run_pretrain(cfg: PretrainConfig) -> Artifact | None:
    """Pretrain a backbone as `cfg` says and write its artifact to `cfg.out`.

    Returns the Artifact on rank 0 (None on other ranks).
    """
    with stage_run("pretrain", cfg) as run:
        train = run.manifest.rows(["train", "unlabeled"])
        if len(train) == 0:
            raise FinegrainError(f"{cfg.manifest} has no train or unlabeled images to pretrain on")
        backbone, weights_source = build_backbone(cfg.backbone, weights=cfg.weights, pretrained=cfg.pretrained)
        data_cfg = data_config(backbone)
        method_cls = PRETRAIN_METHODS.get(cfg.method)
        method = method_cls(backbone, cfg.method_options(), freeze_bn=freeze_bn_for(cfg.freeze_bn, weights_source))
        views, layers = defaults_for_weights(cfg, weights_source)
        trained = train_only(method.backbone, layers)
        recipe = make_recipe(views, image_size=cfg.image_size, mean=data_cfg["mean"], std=data_cfg["std"])
        dataset = ManifestDataset(_unlabelled(train), build_view(recipe), n_views=2, on_bad_image=TRAINING_BAD_IMAGE_POLICY,
                                  cache=image_cache(cfg, train, cfg.image_size), seed=cfg.seed)
        lr = lr_for(cfg, method_cls.base_lr)
        if cfg.lr is None and weights_source != "none" and layers == "all":
            log.warning("lr %.3g is %s's base rate for training from scratch; training every layer of loaded weights "
                        "at it can wreck them: consider "
                        "--lr 0.005, or leave --train-layers at its default (bn)", lr, cfg.method)
        log.info("pretrain: %s %s on %d images at %dpx, batch %d, lr %.3g, BatchNorm %s, backbone layers %s (%d tensors "
                 "train), device %s", cfg.method, cfg.backbone, len(train), cfg.image_size, cfg.batch_size, lr,
                 "frozen" if method.freeze_bn else "trained", layers, trained, run.device)
        result = run.fit(method, dataset, data_cfg, lr=lr, view_recipe=recipe.to_dict(), resolved_views=views,
                         resolved_train_layers=layers)
        if result is None:
            return None
        info = {**model_info(cfg, backbone, data_cfg, weights_source), "method": cfg.method,
                "projection_dim": cfg.proj_dim, "class_names": None, "wandb_artifact": f"pretrain-{cfg.method}"}
        metrics = {"final_loss": result.last_loss, "steps": result.steps, **result.monitor}
        return run.write(method.artifact_state(), info, metrics)


def defaults_for_weights(cfg: PretrainConfig, weights_source: str) -> tuple[str, str]:
    """(view recipe, train layers): as given, else chosen for the starting weights.

    From loaded weights (ImageNet, an artifact): colour-keeping views and BatchNorm-only training,
    which keep the starting features (benchmarks/README.md has the measurement) where training
    every layer at the method's rate lost most of them. From random weights: SimCLR views, every layer.
    """
    loaded = weights_source != "none"
    views = cfg.views or ("color_safe" if loaded else "simclr")
    layers = cfg.train_layers or ("bn" if loaded else "all")
    return views, layers


def _unlabelled(manifest: Manifest) -> Manifest:
    """The same rows with labels hidden: pretraining never sees them."""
    table = manifest.table.copy()
    table["label"] = ""
    table["split"] = "unlabeled"
    return dataclasses.replace(manifest, table=table)
