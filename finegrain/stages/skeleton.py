"""What every stage does around its own work, written once.

    with stage_run("supcon", cfg) as run:      # device and seeds, output folder, manifest checked
        ...                                    # the stage's own work: rows, model, data
        result = run.fit(method, dataset, ...)  # training stages: tracker, kNN monitor, the engine
        return run.write(state, info, metrics)  # artifact, W&B summary and artifact, log line
                                               # always: tracker closed, process group left

A stage module then holds only what differs: which rows, which method, what its artifact records.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from finegrain import dist
from finegrain.artifacts import ARTIFACT_FILE, Artifact, write_artifact
from finegrain.config import StageConfig, TrainConfig
from finegrain.data.manifest import Manifest
from finegrain.data.validate import load_checked_manifest
from finegrain.engine.checkpoint import CHECKPOINT_FILE, stored_wandb_run_id
from finegrain.engine.device import resolve_amp, resolve_device
from finegrain.engine.loop import FitResult, fit
from finegrain.errors import FinegrainError
from finegrain.eval.monitor import knn_monitor
from finegrain.fsutil import remove_stale_temporaries
from finegrain.tracking import Tracker, wandb_parent

log = logging.getLogger("finegrain")


@dataclass
class StageRun:
    """One stage while it runs: its config, device, output folder, checked manifest, tracker and parent lineage."""

    stage: str
    cfg: StageConfig
    device: torch.device
    out: Path
    manifest: Manifest
    parent: dict | None = None  # the lineage of the artifact this stage starts from
    tracker: Tracker | None = None
    config: dict = field(default_factory=dict)  # the resolved config recorded with the artifact and the W&B run

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return resolve_amp(self.cfg.amp, self.device)

    def track(self, **resolved) -> None:
        """Start the W&B run and metrics.jsonl (rank 0) with the config plus `resolved` values (resolved lr, ...)."""
        self.config = {"stage": self.stage, **self.cfg.to_dict(), **resolved}
        if not dist.is_main():
            return
        cfg = self.cfg
        resume = isinstance(cfg, TrainConfig) and cfg.resume
        self.tracker = Tracker(self.out, mode=cfg.wandb, project=cfg.wandb_project, entity=cfg.wandb_entity,
                               tags=cfg.wandb_tags, job_type=self.stage, config=self.config,
                               run_id=stored_wandb_run_id(self.out) if resume else None)
        if self.parent is None:
            self.tracker.use_dataset(cfg.manifest, name=f"manifest-{self.manifest.content_hash[:12]}")

    def fit(self, method, dataset, data_cfg: dict, *, lr: float, sampler=None, param_groups=None,
            **resolved) -> FitResult | None:
        """Track, then train `method` with the engine and the kNN monitor; None on ranks other than 0."""
        self.track(resolved_lr=lr, **resolved)
        result = fit(method, dataset, self.cfg, self.out, device=self.device, base_lr=lr, tracker=self.tracker,
                     sampler=sampler, param_groups=param_groups,
                     monitor=knn_monitor(self.cfg, self.manifest, data_cfg, self.device, self.amp_dtype))
        return result if dist.is_main() else None

    def write(self, state: dict[str, torch.Tensor], info: dict, metrics: dict, *, wandb_type: str = "model",
              wandb_folder: Path | None = None) -> Artifact:
        """Write the artifact (config, weights, info + manifest, lineage, metrics), then log it to W&B."""
        wandb_name = info.pop("wandb_artifact", self.stage)
        artifact = write_artifact(self.out, stage=self.stage, config=self.config, state_dict=state, info={
            **info, "manifest": str(self.cfg.manifest), "manifest_hash": self.manifest.content_hash,
            "parent": self.parent, "metrics": metrics, "wandb_run_id": self.tracker.run_id if self.tracker else None,
            "wandb_artifact": wandb_name})
        self._drop_checkpoint()
        if self.tracker is not None:
            self.tracker.summary({k: v for k, v in metrics.items() if v is not None})
            self.tracker.log_artifact(wandb_folder or self.out, name=wandb_name, type=wandb_type, metadata=metrics,
                                      parent=wandb_parent(self.parent))
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
        log.info("%s: wrote artifact %s (%s)", self.stage, self.out, shown)
        return artifact


    def _drop_checkpoint(self) -> None:
        """A finished training run's checkpoint is only disk (a resume of it is refused): removed unless
        --keep-checkpoint. It stays until artifact.json is written, so a crash before that still resumes."""
        checkpoint = self.out / CHECKPOINT_FILE
        if isinstance(self.cfg, TrainConfig) and not self.cfg.keep_checkpoint and checkpoint.is_file():
            checkpoint.unlink()
            log.debug("%s: removed %s (the run is complete; --keep-checkpoint keeps it)", self.stage, checkpoint)


@contextmanager
def stage_run(stage: str, cfg: StageConfig, *, unseen_classes: str = "warn") -> Iterator[StageRun]:
    """Set up a stage (device and seeds, output folder, manifest checked), yield it, and always clean up.

    Species with val/test photos but no train photos are allowed (data/validate.py: load_checked_manifest, whose
    `unseen_classes` says how loudly): training uses the species that have train photos.

    Training stages (a TrainConfig) also join torchrun's process group and refuse to overwrite a
    finished artifact or ignore a checkpoint; evaluate may rewrite its own earlier evaluation.
    """
    training = isinstance(cfg, TrainConfig)
    device = resolve_device(cfg.device)
    run: StageRun | None = None
    owns_group = training and not dist.is_initialized()  # under `finegrain run` the pipeline owns it
    try:
        if training and dist.init_from_env(device.type) and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank())
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        out = prepare_out_dir(cfg, stage, training=training)
        manifest = load_checked_manifest(cfg.manifest, root=cfg.root, on_bad_image=cfg.on_bad_image,
                                         progress=dist.is_main(), unseen_classes=unseen_classes)
        run = StageRun(stage, cfg, device, out, manifest)
        yield run
    finally:
        if run is not None and run.tracker is not None:
            run.tracker.finish()
        if owns_group:
            dist.cleanup()


def prepare_out_dir(cfg: StageConfig, stage: str, *, training: bool) -> Path:
    """The output folder, checked writable; refuses to overwrite another artifact or ignore a checkpoint."""
    if not cfg.out:
        raise FinegrainError(f"--out is required: the folder the {stage} stage writes its artifact to")
    out = Path(cfg.out)
    if (out / ARTIFACT_FILE).is_file():
        previous = json.loads((out / ARTIFACT_FILE).read_text()).get("stage")
        if training and cfg.resume:
            raise FinegrainError(f"--resume: {out} holds a finished {previous} run (its artifact is written), so there "
                                 f"is nothing to resume; use it as it is (e.g. --from {out}) or train again into "
                                 "another --out")
        if training or previous != stage:
            raise FinegrainError(f"{out} already holds a finished artifact ({previous}); choose another --out or delete it")
    if training and (out / CHECKPOINT_FILE).is_file() and not cfg.resume:
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


def lr_for(cfg: TrainConfig, base_lr: float) -> float:
    """cfg.lr, or `base_lr` (per 256 images) scaled to the global batch (batch x accumulate x processes)."""
    return cfg.lr if cfg.lr is not None else base_lr * cfg.batch_size * cfg.accumulate * dist.world_size() / 256


def model_info(cfg: TrainConfig, backbone: torch.nn.Module, data_cfg: dict, weights_source: str) -> dict:
    """What artifact.json records of a trained model: backbone, sizes, preprocessing, weight source."""
    return {"backbone": cfg.backbone, "embedding_dim": backbone.num_features, "image_size": cfg.image_size,
            "mean": list(data_cfg["mean"]), "std": list(data_cfg["std"]), "interpolation": data_cfg.get("interpolation"),
            "crop_pct": data_cfg.get("crop_pct"), "bbox_crop": False, "weights_source": weights_source}
