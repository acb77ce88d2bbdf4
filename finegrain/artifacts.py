"""The stage-artifact contract: one folder per stage run that a later stage needs nothing else from.

    config.yaml         the fully resolved stage config
    model.safetensors   weights ("backbone.*", "head.*", ...): never a pickle
    artifact.json       stage, backbone, embedding size, image size, normalisation, class names,
                        manifest hash, parent, package versions, metrics, W&B run id, weights hash
    metrics.jsonl       one line per logged step or epoch
    checkpoint.pt       training state for --resume (torch.load(weights_only=True)) while the run is
                        unfinished; removed once artifact.json is written, unless --keep-checkpoint

artifact.json is written last and atomically: a folder without it (or whose weights do not match
the hash it records) is incomplete, and `load_artifact` refuses it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from finegrain.errors import FinegrainError
from finegrain.fsutil import atomic_path, atomic_write_text

ARTIFACT_FILE = "artifact.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict:
    """Versions of the packages that decide a run's numbers."""
    import albumentations
    import timm

    import finegrain

    return {"finegrain": finegrain.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "albumentations": albumentations.__version__, "python": platform.python_version()}


@dataclass
class Artifact:
    """A complete stage artifact. `info` is the parsed artifact.json."""

    path: Path
    info: dict

    @property
    def hash(self) -> str:
        """Identity of the artifact: hash of its stage, config, inputs and weights."""
        return self.info["artifact_hash"]

    def state_dict(self, prefix: str | None = None) -> dict[str, torch.Tensor]:
        """Weights from model.safetensors; with `prefix` ("backbone."), only those keys, prefix removed."""
        state = load_file(self.path / WEIGHTS_FILE)
        if prefix is None:
            return state
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    def lineage(self) -> dict:
        """What a child artifact records as its `parent`: path, hash, stage and W&B artifact name."""
        return {"path": str(self.path.resolve()), "hash": self.hash, "stage": self.info["stage"],
                "wandb_artifact": self.info.get("wandb_artifact")}

    def config(self) -> dict:
        """The resolved config the stage ran with."""
        return yaml.safe_load((self.path / CONFIG_FILE).read_text())


def write_artifact(out_dir, *, stage: str, config: dict, state_dict: dict[str, torch.Tensor], info: dict) -> Artifact:
    """Write config.yaml, model.safetensors and (last) artifact.json into `out_dir`.

    Args:
        stage: "pretrain", "supcon", ...
        config: the resolved config (plain types).
        state_dict: tensors to save (moved to CPU, made contiguous).
        info: the rest of artifact.json (backbone, embedding_dim, image_size, mean, std,
            class_names, manifest_hash, parent, metrics, wandb_run_id, ...).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"stage": stage})
    weights_sha = file_sha256(out / WEIGHTS_FILE)
    identity = json.dumps({"stage": stage, "config": config, "manifest": info.get("manifest_hash"),
                           "parent": (info.get("parent") or {}).get("hash"), "weights": weights_sha}, sort_keys=True, default=str)
    full = {
        "stage": stage, **info, "weights_sha256": weights_sha,
        "artifact_hash": hashlib.sha256(identity.encode()).hexdigest(),
        "versions": package_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": True,
    }
    atomic_write_text(out / ARTIFACT_FILE, json.dumps(full, indent=2, default=str) + "\n")
    return Artifact(out, full)


def load_artifact(path) -> Artifact:
    """Open a complete artifact folder.

    Raises:
        FinegrainError: the folder is missing, unfinished (no artifact.json), or its weights do not
            match the recorded hash (a crash or a hand edit).
    """
    path = Path(path)
    if not path.is_dir():
        raise FinegrainError(f"artifact folder not found: {path}")
    meta = path / ARTIFACT_FILE
    if not meta.is_file():
        raise FinegrainError(f"{path} is not a complete artifact (no {ARTIFACT_FILE}; the stage may not have finished)")
    try:
        info = json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise FinegrainError(f"{meta} is not valid JSON ({e})") from None
    weights = path / WEIGHTS_FILE
    if not info.get("complete") or not weights.is_file() or file_sha256(weights) != info.get("weights_sha256"):
        raise FinegrainError(f"{path}: weights missing or not the ones recorded in {ARTIFACT_FILE}; refusing a half-written artifact")
    return Artifact(path, info)
