"""`finegrain export ARTIFACT -o DIR`: the folder a device needs to name species without torch.

    DIR/model.onnx        preprocessing + backbone + classifier + open-set score (onnx_model.py)
    DIR/model.int8.onnx   with --int8: int8 convolutions (quantize.py)
    DIR/predict.py        the runner (finegrain/runtime/runner.py, copied): numpy, Pillow, onnxruntime
    DIR/requirements.txt  those three packages
    DIR/README.md         how to install and run it, what the model expects and returns
    DIR/export.json       what was exported from what: the parent artifact, the files' hashes, int8 checks
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import onnx

import finegrain
from finegrain.artifacts import file_sha256, load_artifact
from finegrain.config import ExportConfig
from finegrain.export import EXPORT_FILE
from finegrain.export.onnx_model import classifier_of, compose, export_parts
from finegrain.export.readme import readme
from finegrain.fsutil import atomic_path, atomic_write_text
from finegrain.runtime import runner

log = logging.getLogger("finegrain")

MODEL_FILE = runner.MODEL_FILE
INT8_FILE = "model.int8.onnx"
REQUIREMENTS = ("numpy>=1.24", "Pillow>=10", "onnxruntime>=1.17")


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write an ONNX model atomically, weights inside the file."""
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def run_export(config: ExportConfig) -> dict:
    """Export `config.artifact` into `config.out`; returns export.json's record (files, sizes, int8 checks)."""
    artifact = load_artifact(config.artifact)
    classifier_of(artifact)  # refuse before any work
    out = Path(config.out)
    log.info("export: tracing %s (%s) to ONNX", artifact.path, artifact.info.get("backbone"))
    parts = export_parts(artifact)
    save_model(compose(parts), out / MODEL_FILE)
    runner.load_model(out)  # the runner opens what was written, or this stops here
    int8 = None
    if config.int8:
        from finegrain.export.quantize import manifest_photos, quantize_network

        log.info("export: int8 calibration on up to %d train photos of %s", config.calibration_photos,
                 config.calibration_manifest)
        photos = (px for _, px in manifest_photos(config.calibration_manifest, config.calibration_photos, config.seed))
        save_model(compose(parts, quantize_network(parts.network, parts.preprocess, photos,
                                                   per_channel=config.per_channel)), out / INT8_FILE)
        int8 = compare_int8(out, config)
    atomic_write_text(out / "predict.py", Path(runner.__file__).read_text())
    atomic_write_text(out / "requirements.txt", "\n".join(REQUIREMENTS) + "\n")
    shipped = [MODEL_FILE, *([INT8_FILE] if int8 else []), "predict.py"]
    files = {name: {"bytes": (out / name).stat().st_size, "sha256": file_sha256(out / name)} for name in shipped}
    record = {"stage": "export", "format": config.format, "files": files, "metadata": parts.metadata,
              "parent": artifact.lineage(), "int8": int8, "config": {k: str(v) if isinstance(v, Path) else v
                                                                    for k, v in config.to_dict().items()},
              "finegrain_version": finegrain.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(out / "README.md", readme(record))
    from finegrain.export.tracking import log_export

    record["wandb_run_id"] = log_export(out, record, config)
    atomic_write_text(out / EXPORT_FILE, json.dumps(record, indent=2) + "\n")
    for name in (MODEL_FILE, INT8_FILE, "predict.py", "requirements.txt", "README.md", EXPORT_FILE):
        if (out / name).is_file():  # atomic writes leave 0600; the folder is meant to be copied and shared
            (out / name).chmod(0o644)
    return record


def compare_int8(out: Path, config: ExportConfig) -> dict:
    """int8 against fp32 on up to config.check_photos val photos (test when there is no val) of the calibration
    manifest: top-1 agreement, top-1 accuracy of each on the labelled ones, file sizes."""
    from finegrain.data.manifest import Manifest
    from finegrain.export.quantize import manifest_photos

    split = "val" if len(Manifest.load(config.calibration_manifest).rows("val")) else "test"
    fp32, int8 = runner.load_model(out / MODEL_FILE), runner.load_model(out / INT8_FILE)
    agree = right32 = right8 = labelled = total = 0
    for label, px in manifest_photos(config.calibration_manifest, config.check_photos, config.seed, split=split):
        a, b = (int(m.run(px[None])["probabilities"][0].argmax()) for m in (fp32, int8))
        total += 1
        agree += a == b
        if label in fp32.classes:
            labelled += 1
            right32 += fp32.classes[a] == label
            right8 += fp32.classes[b] == label
    size32, size8 = ((out / f).stat().st_size for f in (MODEL_FILE, INT8_FILE))
    result = {"split": split, "photos": total, "top1_agreement": agree / max(total, 1), "labelled": labelled,
              "fp32_top1": right32 / labelled if labelled else None,
              "int8_top1": right8 / labelled if labelled else None,
              "fp32_bytes": size32, "int8_bytes": size8, "size_ratio": size8 / size32,
              "calibration_photos": config.calibration_photos, "per_channel": config.per_channel}
    log.info("export: int8 is %.2f of fp32's size; top-1 agrees with fp32 on %.1f%% of %d %s photos", size8 / size32,
             100 * result["top1_agreement"], total, split)
    return result
