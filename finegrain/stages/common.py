"""What the training stages share: device and seeds, manifest checks, backbone, data, monitor, artifact."""

from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from finegrain import dist
from finegrain.artifacts import ARTIFACT_FILE
from finegrain.config import TrainConfig
from finegrain.data.cache import DecodedImageCache
from finegrain.data.dataset import ManifestDataset
from finegrain.data.manifest import Manifest
from finegrain.data.validate import check_manifest_or_raise
from finegrain.data.views import build_view, make_recipe
from finegrain.engine.checkpoint import CHECKPOINT_FILE
from finegrain.engine.device import resolve_amp, resolve_device
from finegrain.errors import FinegrainError
from finegrain.fsutil import remove_stale_temporaries

log = logging.getLogger("finegrain")

# --on-bad-image is applied when the manifest is checked, before training starts ("error" stops there).
# A file that breaks after that check (changed on disk mid-run) is skipped with a warning, so hours of
# training never die in the middle of an epoch because of one file.
TRAINING_BAD_IMAGE_POLICY = "skip"


def setup(cfg: TrainConfig) -> torch.device:
    """Resolve the device, join torchrun's process group if there is one, seed every RNG."""
    device = resolve_device(cfg.device)
    if dist.init_from_env(device.type) and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank())
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    return device


def prepare_out_dir(cfg: TrainConfig) -> Path:
    """The output folder; refuses to overwrite a finished artifact or ignore a checkpoint silently."""
    if not cfg.out:
        raise FinegrainError("--out is required: the folder the stage writes its artifact to")
    out = Path(cfg.out)
    if (out / ARTIFACT_FILE).is_file():
        raise FinegrainError(f"{out} already holds a finished artifact; choose another --out or delete it")
    if (out / CHECKPOINT_FILE).is_file() and not cfg.resume:
        raise FinegrainError(f"{out} holds a checkpoint of an unfinished run: pass --resume to continue it, or choose another --out")
    if dist.is_main():
        _check_writable(out)
        for tmp in remove_stale_temporaries(out):
            log.info("removed %s, left half-written by a run that was killed", tmp.name)
    return out


def _check_writable(out: Path) -> None:
    """Fail before training, not at the first checkpoint, when `out` cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out) as f:
            f.write(b"finegrain")
    except OSError as e:
        raise FinegrainError(f"cannot write into {out} ({e.strerror or e}); choose another --out") from None


def load_checked_manifest(cfg, *, allow_unseen_classes: bool = False) -> Manifest:
    """Load the manifest and validate it before training (bad files dropped with --on-bad-image skip).

    cfg: any stage config with manifest, root and on_bad_image.
    """
    if not cfg.manifest:
        raise FinegrainError("--manifest is required")
    manifest = Manifest.load(cfg.manifest, root=cfg.root)
    manifest, report = check_manifest_or_raise(manifest, on_bad_image=cfg.on_bad_image, progress=dist.is_main(),
                                                allow_unseen_classes=allow_unseen_classes)
    skipped = [p for p in report.errors if p.path in report.bad_files]
    if skipped:
        log.warning("--on-bad-image skip: leaving out %d file(s):\n  - %s%s", len(skipped),
                    "\n  - ".join(str(p) for p in skipped[:20]), "\n  ..." if len(skipped) > 20 else "")
    for p in report.warnings[:10]:
        log.warning("manifest: %s", p)
    return manifest


def split_rows(manifest: Manifest, split: str, classes=None) -> Manifest:
    """Rows of `split` (train/val/test rows always carry a label), only those of `classes` when given."""
    rows = manifest.select(split)
    if classes is None:
        return rows
    return Manifest(rows.table[rows.table["label"].isin(classes)].reset_index(drop=True), rows.root)


def class_codes(rows: Manifest, classes) -> torch.Tensor:
    """(N,) int64 index into `classes` of each row's label."""
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[str(v)] for v in rows.table["label"]], dtype=torch.long)


def wandb_parent(parent: dict | None) -> str | None:
    """The W&B artifact reference ("name:latest") of a parent lineage dict, for Tracker.log_artifact."""
    return f"{parent['wandb_artifact']}:latest" if parent and parent.get("wandb_artifact") else None


def batchnorm_frozen(cfg: TrainConfig, weights_source: str) -> bool:
    """Whether to freeze the backbone's BatchNorm: cfg.freeze_bn, except for random initial weights.

    A randomly initialised backbone has no statistics worth keeping (and frozen identity BatchNorm
    would leave it unnormalised), so freeze_bn is dropped there with a log line.
    """
    if cfg.freeze_bn and weights_source == "none":
        log.info("BatchNorm trains normally: random initial weights have no statistics to keep (--freeze-bn ignored)")
        return False
    return cfg.freeze_bn


def build_backbone(cfg: TrainConfig) -> tuple[torch.nn.Module, str]:
    """The timm backbone (pooled features, no classifier) and a name for its weight source.

    weights: None -> built-in offline weights when the backbone has them, else random init;
    "builtin"; "none" (random); or a file (.safetensors / .pth state dict). The source is
    "builtin", "none", "timm-hub" or the file path, for artifact.json.
    """
    from finegrain.models.backbone import create_backbone
    from finegrain.models.weights import BUILTIN_WEIGHTS

    weights = cfg.weights
    if weights is None and not cfg.pretrained:
        entry = BUILTIN_WEIGHTS.get(cfg.backbone)
        weights = "builtin" if entry is not None and entry.installed() else "none"
        if weights == "none":
            log.warning("no weights given for %s: starting from random initialisation (see --weights, --pretrained)", cfg.backbone)
    builtin = weights == "builtin"
    file = None if weights in (None, "builtin", "none") else weights
    source = "timm-hub" if cfg.pretrained else weights
    return create_backbone(cfg.backbone, weights=file, pretrained=cfg.pretrained, builtin=builtin), source


def image_cache(cfg: TrainConfig, manifest: Manifest, image_size: int, *, collective: bool = True) -> DecodedImageCache | None:
    """The decoded-image cache for these rows, or None when disabled.

    collective: every rank calls this; rank 0 builds the cache while the others wait. Pass False
    when only one rank calls it (the kNN monitor).
    """
    if not cfg.cache_images:
        return None
    cache_dir = Path(cfg.cache_dir or os.environ.get("FINEGRAIN_CACHE", Path.home() / ".cache" / "finegrain" / "images"))
    side = int(round(image_size / 0.875))
    if collective and not dist.is_main():
        dist.barrier()  # wait while rank 0 builds it, then open it
    cache = DecodedImageCache.open_or_build(manifest, cache_dir, shorter_side=side, on_bad_image=cfg.on_bad_image,
                                            progress=dist.is_main())
    if collective and dist.is_main():
        dist.barrier()
    return cache


def eval_dataset(cfg, manifest: Manifest, *, image_size: int, mean, std, class_names, crop_to_bbox: bool = False,
                 collective: bool = True) -> ManifestDataset:
    """Single eval views of these rows: [crop to box,] resize, center crop, normalise with mean/std.

    cfg: any stage config with cache_images, cache_dir and on_bad_image.
    """
    recipe = make_recipe("eval", image_size=image_size, mean=mean, std=std, crop_to_bbox=crop_to_bbox)
    return ManifestDataset(manifest, build_view(recipe), class_names=class_names, on_bad_image=cfg.on_bad_image,
                           cache=image_cache(cfg, manifest, image_size, collective=collective))


def knn_monitor(cfg: TrainConfig, manifest: Manifest, data_cfg: dict, device: torch.device):
    """A callable monitor(method, epoch) -> {"knn_top1": ...} on labelled train vs val (or test) rows.

    Like solo-learn's online kNN: it only shows whether the representation improves; nothing is
    tuned on it. Returns None when the manifest has no labelled train and val/test rows.
    """
    from finegrain.eval.features import extract_features
    from finegrain.eval.knn import knn_scores, topk_accuracy

    if not cfg.knn_monitor or not dist.is_main():
        return None
    train = manifest.select("train")
    query_split = "val" if (manifest.table["split"] == "val").any() else "test"
    names = sorted(set(train.table["label"]))
    query = split_rows(manifest, query_split, names)
    if len(train) == 0 or len(query) == 0:
        return None
    norm = dict(image_size=cfg.image_size, mean=data_cfg["mean"], std=data_cfg["std"], class_names=names, collective=False)
    train_ds = eval_dataset(cfg, train, **norm)
    query_ds = eval_dataset(cfg, query, **norm)
    amp = resolve_amp(cfg.amp, device)

    def monitor(method, epoch):
        was_training = method.training
        method.eval()
        ftr, ytr = extract_features(method.embed, train_ds, device=device, workers=cfg.workers, amp_dtype=amp, progress="kNN monitor: train features")
        fq, yq = extract_features(method.embed, query_ds, device=device, workers=cfg.workers, amp_dtype=amp, progress=f"kNN monitor: {query_split} features")
        method.train(was_training)
        acc = topk_accuracy(knn_scores(ftr, ytr, fq, num_classes=len(names)), yq)
        return {f"knn_top1_{query_split}": acc[1], f"knn_top5_{query_split}": acc[5]}

    return monitor


def stored_run_id(out) -> str | None:
    """The W&B run id saved in `out`'s checkpoint (so a resumed run continues the same W&B run)."""
    from finegrain.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out)
    return ckpt.get("wandb_run_id") if ckpt else None
