"""`finegrain supcon`: supervised contrastive (or triplet, or cross-entropy) fine-tuning on labels.

Starts from a pretrain artifact (`--from`) or backbone weights, trains on the labelled train
split, then fits a linear classifier on the embedding, so the artifact can classify as well as
embed. Writes a stage artifact with "backbone.*", "head.*" and "classifier.*" weights.
"""

from __future__ import annotations

import logging

import torch

from finegrain import dist
from finegrain.artifacts import Artifact, load_artifact, write_artifact
from finegrain.config import SupconConfig
from finegrain.data.dataset import ManifestDataset
from finegrain.data.views import build_view, make_recipe
from finegrain.engine.device import resolve_amp
from finegrain.engine.loop import fit
from finegrain.engine.sampler import ClassBalancedSampler, EpochSampler
from finegrain.errors import FinegrainError
from finegrain.stages.common import (
    TRAINING_BAD_IMAGE_POLICY, batchnorm_frozen, build_backbone, class_codes, eval_dataset, image_cache, knn_monitor,
    load_checked_manifest, prepare_out_dir, setup, split_rows, stored_run_id, wandb_parent,
)
from finegrain.stages.supcon_methods import OBJECTIVES, SupervisedMethod

log = logging.getLogger("finegrain")

BASE_LR = 0.2  # SGD, per 256 images, for the head; the backbone gets backbone_lr_scale x this
SAMPLERS = ("pk", "random")


def starting_backbone(cfg) -> tuple[torch.nn.Module, str, dict | None]:
    """The backbone to start from: (model, weights source, parent lineage or None).

    With `from_artifact`, the backbone name and weights come from that artifact's "backbone.*"
    weights and the artifact becomes the parent; otherwise `build_backbone(cfg)`.
    """
    from finegrain.models.backbone import create_backbone

    if not cfg.from_artifact:
        model, source = build_backbone(cfg)
        return model, source, None
    parent = load_artifact(cfg.from_artifact)
    name = parent.info["backbone"]
    if cfg.backbone != name:
        log.info("backbone: %s (from the artifact %s)", name, parent.path)
        cfg.backbone = name
    model = create_backbone(name, weights=parent.path)
    return model, f"artifact:{parent.path}", parent.lineage()


def _classes_per_batch(cfg: SupconConfig, num_classes: int) -> int:
    p = cfg.classes_per_batch
    if cfg.batch_size % p:
        raise FinegrainError(f"--batch-size {cfg.batch_size} must be a multiple of --classes-per-batch {p} (P x K batches)")
    if p > num_classes:
        p = max(d for d in range(1, num_classes + 1) if cfg.batch_size % d == 0)
        log.warning("only %d classes: using %d classes x %d images per batch", num_classes, p, cfg.batch_size // p)
    if p == cfg.batch_size:
        log.warning("P x K batches of %d classes x 1 image have no positives; lower --classes-per-batch", p)
    return p


def _param_groups(method: SupervisedMethod, cfg: SupconConfig) -> list[dict]:
    """Optimizer groups: the head at the full rate, the backbone at backbone_lr_scale (x timm layer decay)."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    groups = [dict(g, lr_scale=1.0) for g in param_groups_weight_decay(method.head, cfg.weight_decay)]
    if cfg.layer_decay:
        backbone_groups = param_groups_layer_decay(method.backbone, cfg.weight_decay, layer_decay=cfg.layer_decay)
    else:
        backbone_groups = [dict(g, lr_scale=1.0) for g in param_groups_weight_decay(method.backbone, cfg.weight_decay)]
    for g in backbone_groups:
        g["lr_scale"] = g["lr_scale"] * cfg.backbone_lr_scale
    return [g for g in groups + backbone_groups if g["params"]]


def run_supcon(cfg: SupconConfig) -> Artifact | None:
    """Fine-tune a backbone on the labelled train images as `cfg` says; write the artifact to `cfg.out`.

    Returns the Artifact on rank 0 (None on other ranks).
    """
    if cfg.loss not in OBJECTIVES:
        raise FinegrainError(f"unknown --loss {cfg.loss!r}; choose one of {', '.join(OBJECTIVES)}")
    if cfg.sampler not in SAMPLERS:
        raise FinegrainError(f"unknown --sampler {cfg.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if cfg.n_views < 1:
        raise FinegrainError("--n-views must be at least 1")
    from finegrain.models.backbone import data_config
    from finegrain.tracking import Tracker

    device = setup(cfg)
    out = prepare_out_dir(cfg)
    manifest = load_checked_manifest(cfg)
    train = manifest.select("train")
    class_names = sorted(set(train.table["label"].astype(str)))
    if len(class_names) < 2:
        raise FinegrainError(f"{cfg.manifest} needs labelled train images of at least 2 classes for supcon; found {len(class_names)}")
    backbone, weights_source, parent = starting_backbone(cfg)
    data_cfg = data_config(backbone)
    method = SupervisedMethod(backbone, cfg.loss, num_classes=len(class_names),
                              freeze_bn=batchnorm_frozen(cfg, weights_source), options=dict(
        proj_dim=cfg.proj_dim, proj_hidden=cfg.proj_hidden, temperature=cfg.temperature, margin=cfg.margin,
        neg_margin=cfg.neg_margin, label_smoothing=cfg.label_smoothing, ce_weight=cfg.ce_weight))
    recipe = make_recipe(cfg.views, image_size=cfg.image_size, mean=data_cfg["mean"], std=data_cfg["std"])
    dataset = ManifestDataset(train, build_view(recipe), n_views=cfg.n_views, class_names=class_names,
                              on_bad_image=TRAINING_BAD_IMAGE_POLICY, cache=image_cache(cfg, train, cfg.image_size),
                              seed=cfg.seed)
    rank, world = dist.rank(), dist.world_size()
    if cfg.sampler == "pk":
        sampler = ClassBalancedSampler(class_codes(train, class_names), cfg.batch_size,
                                       _classes_per_batch(cfg, len(class_names)),
                                       seed=cfg.seed, rank=rank, world=world)
    else:
        sampler = EpochSampler(len(dataset), cfg.batch_size, seed=cfg.seed, rank=rank, world=world)
    method.head_warmup_steps = int(round(cfg.head_warmup_epochs * (sampler.batches_per_epoch // cfg.accumulate)))
    lr = cfg.lr if cfg.lr is not None else BASE_LR * cfg.batch_size * cfg.accumulate * world / 256
    config = {"stage": "supcon", **cfg.to_dict(), "resolved_lr": lr, "view_recipe": recipe.to_dict(),
              "head_warmup_steps": method.head_warmup_steps}
    tracker = None
    if dist.is_main():
        tracker = Tracker(out, mode=cfg.wandb, project=cfg.wandb_project, entity=cfg.wandb_entity, tags=cfg.wandb_tags,
                          job_type="supcon", config=config, run_id=stored_run_id(out) if cfg.resume else None)
        if parent is None:
            tracker.use_dataset(cfg.manifest, name=f"manifest-{manifest.content_hash[:12]}")
    log.info("supcon: %s loss, %s on %d labelled images of %d classes at %dpx, batch %d (%s), lr %.3g (backbone x%g), device %s",
             cfg.loss, cfg.backbone, len(train), len(class_names), cfg.image_size, cfg.batch_size, cfg.sampler, lr,
             cfg.backbone_lr_scale, device)
    try:
        result = fit(method, dataset, cfg, out, device=device, base_lr=lr, tracker=tracker, sampler=sampler,
                     param_groups=_param_groups(method, cfg), monitor=knn_monitor(cfg, manifest, data_cfg, device))
        if not dist.is_main():
            return None
        metrics = {"final_loss": result.last_loss, "steps": result.steps, **result.monitor}
        state = {f"backbone.{k}": v for k, v in method.backbone.state_dict().items()}
        state.update({f"head.{k}": v for k, v in method.head.state_dict().items()})
        classifier_info = None
        if cfg.classifier:
            probe = _fit_classifier(cfg, method, manifest, train, class_names, data_cfg, device)
            state["classifier.weight"] = torch.from_numpy(probe.weight)
            state["classifier.bias"] = torch.from_numpy(probe.bias)
            classifier_info = {"input": "l2-normalised backbone features", "C": probe.C_reg, "val_top1": probe.val_top1,
                               "fitted_on": "train"}
            metrics["classifier_val_top1"] = probe.val_top1
        wandb_name = f"supcon-{cfg.loss}"
        artifact = write_artifact(out, stage="supcon", config=config, state_dict=state, info={
            "backbone": cfg.backbone, "method": cfg.loss, "embedding_dim": backbone.num_features,
            "projection_dim": cfg.proj_dim if cfg.loss != "ce" else None, "image_size": cfg.image_size,
            "mean": list(data_cfg["mean"]), "std": list(data_cfg["std"]), "interpolation": data_cfg.get("interpolation"),
            "crop_pct": data_cfg.get("crop_pct"), "bbox_crop": False, "class_names": class_names,
            "classifier": classifier_info, "manifest": str(cfg.manifest), "manifest_hash": manifest.content_hash,
            "parent": parent, "weights_source": weights_source, "metrics": metrics,
            "wandb_run_id": tracker.run_id if tracker else None, "wandb_artifact": wandb_name,
        })
        tracker.summary({k: v for k, v in metrics.items() if v is not None})
        tracker.log_artifact(out, name=wandb_name, type="model", metadata=metrics,
                             parent=wandb_parent(parent))
        log.info("supcon: wrote artifact %s (%s)", out,
                 ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))))
        return artifact
    finally:
        if tracker is not None:
            tracker.finish()
        dist.cleanup()


def _fit_classifier(cfg, method, manifest, train, class_names, data_cfg, device):
    """Logistic regression on the trained backbone's features of the train split (C chosen on val if any)."""
    from finegrain.eval.features import extract_features
    from finegrain.eval.linear import fit_linear_probe

    amp = resolve_amp(cfg.amp, device)
    method.eval()
    norm = dict(image_size=cfg.image_size, mean=data_cfg["mean"], std=data_cfg["std"], class_names=class_names, collective=False)
    x, y = extract_features(method.embed, eval_dataset(cfg, train, **norm), device=device, workers=cfg.workers,
                            amp_dtype=amp, progress="classifier: train features")
    val = split_rows(manifest, "val", class_names)
    vx = vy = None
    if len(val):
        vx, vy = extract_features(method.embed, eval_dataset(cfg, val, **norm), device=device, workers=cfg.workers,
                                  amp_dtype=amp, progress="classifier: val features")
    probe = fit_linear_probe(x, y, num_classes=len(class_names), val_x=vx, val_y=vy, seed=cfg.seed)
    log.info("classifier: logistic regression on %d train features, C %g%s", len(x), probe.C_reg,
             f", val top-1 {probe.val_top1:.3f}" if probe.val_top1 is not None else "")
    return probe
