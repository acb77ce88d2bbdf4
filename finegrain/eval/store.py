"""Features of manifest photos as an artifact (or a bare backbone) reads them, extracted once and cached.

Shared by `evaluate`, `audit` and `suggest`: the artifact's own normalisation, by default 1.125 x its
training size with flip averaging; cached in a folder keyed by model, image size, crop and rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from finegrain.artifacts import Artifact, load_artifact
from finegrain.config import FeatureConfig
from finegrain.data.dataset import eval_dataset
from finegrain.data.manifest import BBOX_COLUMNS, Manifest
from finegrain.errors import FinegrainError
from finegrain.eval import feature_file
from finegrain.eval.features import feature_batches, flip_averaged, ready_for_extraction, test_size
from finegrain.models.backbone import build_backbone, create_backbone, data_config

log = logging.getLogger("finegrain")


class Subject:
    """What is evaluated: a backbone in eval mode, its preprocessing and an identity for the feature cache."""

    def __init__(self, cfg: FeatureConfig):
        self.artifact: Artifact | None = None
        if cfg.from_artifact:
            self.artifact = load_artifact(cfg.from_artifact)
            info = self.artifact.info
            if info.get("stage") == "evaluate":
                raise FinegrainError(f"{cfg.from_artifact} is an evaluation; pass the pretrain or supcon artifact it evaluated")
            self.model = create_backbone(info["backbone"], weights=self.artifact.path)
            self.name, self.identity = info["backbone"], self.artifact.hash
            self.image_size = cfg.image_size or test_size(info["image_size"])
            self.mean, self.std = info["mean"], info["std"]
            self.source = f"{info['stage']} artifact {self.artifact.path}"
        else:
            self.model, weights = build_backbone(cfg.backbone, weights=cfg.weights, pretrained=cfg.pretrained)
            dc = data_config(self.model)
            self.name = cfg.backbone
            self.image_size = cfg.image_size or 224
            self.mean, self.std = dc["mean"], dc["std"]
            self.source = f"{cfg.backbone} ({weights} weights)"
            self.identity = hashlib.sha256(json.dumps([cfg.backbone, weights, _file_id(weights)]).encode()).hexdigest()
        self.model.eval()


def _file_id(weights: str | None):
    path = Path(str(weights))
    return [path.stat().st_size, path.stat().st_mtime_ns] if weights and path.is_file() else None


class FeatureStore:
    """Extracts features of manifest rows once and keeps them in OUT/features/<what>-<key>.npy."""

    def __init__(self, cfg: FeatureConfig, subject: Subject, device: torch.device, folder: Path,
                 amp_dtype: torch.dtype | None = None):
        """folder: the default cache folder (cfg.features_dir overrides it); amp_dtype: autocast dtype or None."""
        self.cfg, self.subject, self.device, self.amp_dtype = cfg, subject, device, amp_dtype
        ready_for_extraction(subject.model, device)
        self.folder = Path(cfg.features_dir) if cfg.features_dir else folder
        self.seconds = 0.0  # wall time spent extracting in this run
        self.extracted = 0

    def key(self, rows: Manifest) -> str:
        """What the features depend on: model, preprocessing and the photos (not their labels or splits)."""
        photos = rows.table[["path"] + (list(BBOX_COLUMNS) if self.cfg.bbox_crop and rows.has_bboxes else [])]
        parts = [self.subject.identity, self.subject.image_size, self.cfg.bbox_crop, self.subject.mean, self.subject.std,
                 str(rows.root), photos.to_csv(index=False, float_format="%.4f")] + (["flip"] if self.cfg.flip_tta else [])
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]

    def features(self, rows: Manifest, what: str) -> torch.Tensor:
        """(N, D) float32 features of `rows`, in row order: a memory map of OUT/features/<what>-<key>.npy, written a
        batch at a time (an interrupted extraction resumes where it stopped)."""
        path = self.folder / f"{what}-{self.key(rows)}.npy"
        if path.is_file():
            log.info("features: %s from cache (%s)", what, path.name)
            return feature_file.read_rows(path)
        if path.with_suffix(".safetensors").is_file():  # a cache written before features went to disk in chunks
            from safetensors.torch import load_file
            return load_file(path.with_suffix(".safetensors"))["features"]
        ds = eval_dataset(self.cfg, rows, image_size=self.subject.image_size, mean=self.subject.mean, std=self.subject.std,
                          class_names=rows.class_names, crop_to_bbox=self.cfg.bbox_crop, collective=False)
        done = feature_file.rows_done(path, len(ds))
        if done:
            log.info("features: %s resumes at photo %d of %d", what, done + 1, len(ds))
        start = time.perf_counter()
        embed = flip_averaged(self.subject.model) if self.cfg.flip_tta else self.subject.model
        batches = feature_batches(embed, Subset(ds, range(done, len(ds))) if done else ds, device=self.device,
                                  batch_size=self.cfg.batch_size, workers=self.cfg.workers, amp_dtype=self.amp_dtype,
                                  progress=f"features: {what}")
        feature_file.write_rows(path, (f for f, _ in batches), len(ds), done)
        seconds, extracted = time.perf_counter() - start, len(ds) - done
        self.seconds += seconds
        self.extracted += extracted
        log.info("features: %s, %d images in %.1f s (%.0f img/s)", what, extracted, seconds, extracted / max(seconds, 1e-9))
        return feature_file.read_rows(path)
