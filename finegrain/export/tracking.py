"""The export as a W&B model artifact whose parent is the supcon artifact it came from (tracking.py's Tracker).

As for the stages: the W&B lineage edge (use_artifact of the parent) is added only online (offline runs cannot
use artifacts); export.json's `parent` records the same lineage locally, which `finegrain runs` reads.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

TRACKING_DIR = "tracking"  # the W&B run's files and metrics.jsonl, inside the export folder
SHIPPED = ("model.onnx", "model.int8.onnx", "predict.py", "requirements.txt", "README.md")


def log_export(out: Path, record: dict, config) -> str | None:
    """Log the export folder's shipped files as a W&B "model" artifact named export-<parent's name>; the run id,
    or None when --wandb disabled (or W&B could not start)."""
    if config.wandb == "disabled":
        return None
    from finegrain.tracking import Tracker, wandb_parent

    parent = record["parent"]
    tracker = Tracker(out / TRACKING_DIR, mode=config.wandb, project=config.wandb_project, entity=config.wandb_entity,
                      job_type="export", config=record["config"])
    metrics = {"int8_" + k: v for k, v in (record.get("int8") or {}).items() if isinstance(v, (int, float))}
    metrics.update({f"{name}_bytes": f["bytes"] for name, f in record["files"].items()})
    with tempfile.TemporaryDirectory() as tmp:  # only what ships; finished before the copies go
        try:
            tracker.log(metrics)
            tracker.summary(metrics)
            for name in SHIPPED:
                if (out / name).is_file():
                    shutil.copy2(out / name, Path(tmp) / name)
            tracker.log_artifact(tmp, name=f"export-{parent.get('wandb_artifact') or parent['stage']}", type="model",
                                 metadata={**metrics, "parent_hash": parent["hash"],
                                           "artifact_hash": record["metadata"]["artifact_hash"]},
                                 parent=wandb_parent(parent))
            return tracker.run_id
        finally:
            tracker.finish()
