"""`finegrain supcon`: supervised fine-tuning on labels with any objective in SUPCON_LOSSES.

Starts from a pretrain artifact (`--from`) or backbone weights, trains on the labelled train
split (and, with `--unlabeled pseudo` or `--teacher`, the unlabeled photos beside it), then fits a
linear classifier on the embedding, so the artifact can classify as well as embed, and calibrates an
unknown-species score for it (eval/open_set.py). Writes a stage artifact with "backbone.*", "head.*" and
"classifier.*" weights, and "open_set.train_features" / "open_set.train_labels": the (N, D) float16
L2-normalised train features and class ids the score is measured against (N x D x 2 bytes: 15 MB for
6,000 photos of 1280-d features).
"""

from __future__ import annotations

import dataclasses

import logging

import pandas as pd
import torch

from finegrain import dist
from finegrain.artifacts import Artifact, load_artifact
from finegrain.config import SupconConfig
from finegrain.data.dataset import TRAINING_BAD_IMAGE_POLICY, ManifestDataset, eval_dataset, image_cache
from finegrain.data.manifest import Manifest
from finegrain.data.views import build_view, make_recipe
from finegrain.errors import FinegrainError
from finegrain.features.extract import extract_features, flip_averaged, test_size
from finegrain.engine.sampler import WithUnlabelled
from finegrain.eval.linear import LinearProbe, fit_linear_probe
from finegrain.eval.open_set import OpenSetReference, fit_open_set
from finegrain.methods import SupervisedMethod, freeze_bn_for, interpolate_weights
from finegrain.methods.teachers import ArtifactTeacher, EmaTeacher
from finegrain.models.backbone import build_backbone, create_backbone, data_config
from finegrain.registry import SAMPLERS, SUPCON_LOSSES
from finegrain.stages.skeleton import StageRun, lr_for, model_info, stage_run

log = logging.getLogger("finegrain")


def run_supcon(cfg: SupconConfig) -> Artifact | None:
    """Fine-tune a backbone on the labelled train images as `cfg` says; write the artifact to `cfg.out`.

    With --unlabeled pseudo or --teacher, the manifest's unlabeled photos join every batch. Returns
    the Artifact on rank 0 (None on other ranks).
    """
    with stage_run("supcon", cfg) as run:
        train, unlabelled = training_rows(cfg, run)
        class_names = sorted(set(train.table["label"].astype(str)))
        backbone, weights_source = starting_backbone(cfg, run)
        data_cfg = data_config(backbone)
        teacher = artifact_teacher(cfg, class_names, data_cfg) if cfg.teacher else None
        method_cls = SUPCON_LOSSES.get(cfg.loss)
        method = method_cls(backbone, cfg.method_options(), num_classes=len(class_names),
                            freeze_bn=freeze_bn_for(cfg.freeze_bn, weights_source))
        if cfg.unlabeled == "pseudo":
            teacher = EmaTeacher(method.backbone, method.classifier, momentum=cfg.teacher_momentum,
                                 threshold=cfg.pseudo_threshold)
        if teacher is not None:
            method.use_teacher(teacher, distill_weight=cfg.distill_weight, distill_temperature=cfg.distill_temperature,
                               pseudo_ce=cfg.pseudo_ce)
        rows = concat_rows(train, unlabelled)
        recipe = make_recipe(cfg.views, image_size=cfg.image_size, mean=data_cfg["mean"], std=data_cfg["std"])
        dataset = ManifestDataset(rows, build_view(recipe), n_views=cfg.n_views, class_names=class_names,
                                  on_bad_image=TRAINING_BAD_IMAGE_POLICY, cache=image_cache(cfg, rows, cfg.image_size),
                                  seed=cfg.seed)
        sampler = _batches(cfg, train.class_codes(class_names), len(unlabelled))
        method.head_warmup_steps = int(round(cfg.head_warmup_epochs * (sampler.batches_per_epoch // cfg.accumulate)))
        lr = lr_for(cfg, method_cls.base_lr)
        start = {k: v.detach().clone() for k, v in backbone.state_dict().items()} if cfg.wise_ft < 1 else None
        log.info("supcon: %s loss, %s on %d labelled images of %d classes%s at %dpx, batch %d (%s), lr %.3g "
                 "(backbone x%g), device %s", cfg.loss, cfg.backbone, len(train), len(class_names),
                 f" + {len(unlabelled)} unlabeled ({'teacher' if cfg.teacher else 'pseudo-labels'})" if len(unlabelled)
                 else "", cfg.image_size, sampler.batch_size, cfg.sampler, lr, cfg.backbone_lr_scale, run.device)
        result = run.fit(method, dataset, data_cfg, lr=lr, sampler=sampler, param_groups=_param_groups(method, cfg),
                         view_recipe=recipe.to_dict(), head_warmup_steps=method.head_warmup_steps)
        if result is None:
            return None
        if start is not None:
            interpolate_weights(method.backbone, start, cfg.wise_ft)
            log.info("supcon: backbone = %g x fine-tuned + %g x starting weights (WiSE-FT)", cfg.wise_ft, 1 - cfg.wise_ft)
        return _write(run, method, train, class_names, data_cfg, weights_source, result)


def _write(run: StageRun, method: SupervisedMethod, train, class_names, data_cfg, weights_source, result) -> Artifact:
    """Fit the classifier (unless --no-classifier) and write the artifact."""
    cfg = run.cfg
    metrics = {"final_loss": result.last_loss, "steps": result.steps, **result.monitor}
    state = method.artifact_state()
    classifier_info = open_set = None
    if cfg.classifier:
        probe, open_set = _fit_classifier(run, method, train, class_names, data_cfg)
        state["classifier.weight"] = torch.from_numpy(probe.weight)
        state["classifier.bias"] = torch.from_numpy(probe.bias)
        if open_set is not None:
            state.update(open_set.tensors())
        classifier_info = {"input": "l2-normalised backbone features", "C": probe.C_reg, "val_top1": probe.val_top1,
                           "fitted_on": "train", "image_size": test_size(cfg.image_size), "flip_tta": True}
        metrics["classifier_val_top1"] = probe.val_top1
    info = {**model_info(cfg, method.backbone, data_cfg, weights_source), "method": cfg.loss,
            "projection_dim": getattr(method.options, "proj_dim", None), "class_names": class_names,
            "classifier": classifier_info, "open_set": open_set.info() if open_set else None,
            "unlabeled": "teacher" if cfg.teacher else cfg.unlabeled, "teacher": str(cfg.teacher) if cfg.teacher else None,
            "wandb_artifact": f"supcon-{cfg.loss}"}
    return run.write(state, info, metrics)


def training_rows(cfg: SupconConfig, run: StageRun) -> tuple[Manifest, Manifest]:
    """(labelled train rows, unlabeled rows used beside them: none unless --unlabeled pseudo or --teacher)."""
    train = run.manifest.rows("train")
    n_classes = len(set(train.table["label"].astype(str)))
    if n_classes < 2:
        raise FinegrainError(f"{cfg.manifest} needs labelled train images of at least 2 classes for supcon; "
                             f"found {n_classes} (no labels yet? `finegrain suggest --manifest M --backbone NAME -o "
                             "next.csv` picks the photos to label first)")
    unlabelled = run.manifest.rows("unlabeled")
    if cfg.unlabeled == "none" and not cfg.teacher:
        return train, unlabelled.rows([])
    if len(unlabelled) == 0:
        if cfg.unlabeled == "pseudo":
            raise FinegrainError(f"--unlabeled pseudo: {cfg.manifest} has no unlabeled photos (rows with split "
                                 "'unlabeled'); add some, or train without --unlabeled")
        log.info("--teacher: %s has no unlabeled photos; distilling on the labelled ones only", cfg.manifest)
    return train, unlabelled


def concat_rows(first: Manifest, second: Manifest) -> Manifest:
    """The rows of `first` then those of `second` (same root)."""
    if len(second) == 0:
        return first
    return dataclasses.replace(first, table=pd.concat([first.table, second.table], ignore_index=True))


def _batches(cfg: SupconConfig, labels: torch.Tensor, n_unlabelled: int):
    """The batch sampler: `cfg.sampler` over the labelled rows (indices 0..L-1), then, when there are
    unlabeled rows (indices L..L+N-1), --unlabeled-batch-size of them in every batch."""
    labelled = SAMPLERS.get(cfg.sampler)(labels, cfg.batch_size, cfg.classes_per_batch, seed=cfg.seed,
                                         rank=dist.rank(), world=dist.world_size())
    if not n_unlabelled:
        return labelled
    return WithUnlabelled(labelled, torch.arange(len(labels), len(labels) + n_unlabelled),
                          cfg.unlabeled_batch_size or cfg.batch_size, seed=cfg.seed, rank=dist.rank(),
                          world=dist.world_size())


def artifact_teacher(cfg: SupconConfig, class_names: list[str], data_cfg: dict) -> ArtifactTeacher:
    """The --teacher artifact as a teacher; refused unless it has a classifier over `class_names` at this image size."""
    teacher = load_artifact(cfg.teacher)
    info, where = teacher.info, f"--teacher {cfg.teacher}"
    if not info.get("classifier"):
        raise FinegrainError(f"{where}: the artifact has no classifier (a supcon artifact trained with --classifier "
                             "is needed)")
    if info.get("class_names") != class_names:
        theirs = info.get("class_names") or []
        differ = sorted(set(theirs) ^ set(class_names))
        raise FinegrainError(f"{where}: its classifier knows {len(theirs)} classes, this manifest's train split has "
                             f"{len(class_names)}" + (f" (differing: {', '.join(differ[:5])})" if differ else
                                                      " in another order") + "; a teacher needs the same class list")
    if info.get("image_size") != cfg.image_size:
        raise FinegrainError(f"{where} was trained at {info.get('image_size')} px and this run trains at "
                             f"{cfg.image_size} px; use --image-size {info.get('image_size')}")
    state = teacher.state_dict("classifier.")
    return ArtifactTeacher(create_backbone(info["backbone"], weights=teacher.path), state["weight"], state["bias"],
                           student_mean=data_cfg["mean"], student_std=data_cfg["std"], teacher_mean=info["mean"],
                           teacher_std=info["std"])


def starting_backbone(cfg: SupconConfig, run: StageRun) -> tuple[torch.nn.Module, str]:
    """The backbone to start from and its weight source; with `from_artifact`, that artifact becomes the parent.

    The backbone name and weights then come from the artifact's "backbone.*" weights.
    """
    if not cfg.from_artifact:
        return build_backbone(cfg.backbone, weights=cfg.weights, pretrained=cfg.pretrained)
    parent = load_artifact(cfg.from_artifact)
    name = parent.info["backbone"]
    if cfg.backbone != name:
        log.info("backbone: %s (from the artifact %s)", name, parent.path)
        cfg.backbone = name
    run.parent = parent.lineage()
    return create_backbone(name, weights=parent.path), f"artifact:{parent.path}"


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


def _fit_classifier(run: StageRun, method: SupervisedMethod, train, class_names,
                    data_cfg) -> tuple[LinearProbe, OpenSetReference | None]:
    """Logistic regression on the trained backbone's features of the train split (C chosen on val if any),
    and the open-set reference with its threshold (calibrated on val, or a train hold-out).

    The features are read as predict and evaluate read them: at the test size, averaged with the mirror image's.
    """
    cfg = run.cfg
    method.eval()
    norm = dict(image_size=test_size(cfg.image_size), mean=data_cfg["mean"], std=data_cfg["std"],
                class_names=class_names, collective=False)
    extract = dict(device=run.device, workers=cfg.workers, amp_dtype=run.amp_dtype)
    embed = flip_averaged(method.embed)
    x, y = extract_features(embed, eval_dataset(cfg, train, **norm), **extract, progress="classifier: train features")
    val = run.manifest.rows("val", class_names)
    vx = vy = None
    if len(val):
        vx, vy = extract_features(embed, eval_dataset(cfg, val, **norm), **extract, progress="classifier: val features")
    probe = fit_linear_probe(x, y, num_classes=len(class_names), val_x=vx, val_y=vy, seed=cfg.seed)
    log.info("classifier: logistic regression on %d train features, C %g%s", len(x), probe.C_reg,
             f", val top-1 {probe.val_top1:.3f}" if probe.val_top1 is not None else "")
    open_set = fit_open_set(x, y, vx, k=cfg.open_set_k, seed=cfg.seed, score=cfg.open_set_score)
    if open_set is None:
        log.warning("open set: no val photos and no species with 2 train photos to calibrate on; the artifact "
                    "cannot flag unknown species")
    else:
        log.info("open set: %s against %d train photos, threshold %.4f (accepts %.0f%% of %s photos)",
                 open_set.score, len(open_set.features), open_set.threshold, 100 * open_set.keep, open_set.calibrated_on)
    return probe, open_set
