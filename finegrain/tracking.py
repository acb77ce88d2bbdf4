"""Run tracking: Weights & Biases (offline unless asked) plus a local metrics.jsonl that always works.

Only this module imports wandb. If W&B cannot start or write, training goes on and the user is
warned once; metrics.jsonl still gets every line.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

log = logging.getLogger("finegrain")

WANDB_MODES = ("offline", "online", "disabled")


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _with_thumbnails(table, wandb):
    """`table` with its `photo` column (files) as 96 px wandb.Image thumbnails; as it is without one."""
    if "photo" not in table.columns:
        return table
    from PIL import Image

    def thumb(path):
        if hasattr(path, "read"):  # a shard record (data/shards.ShardPhoto): no file to open
            im = Image.fromarray(path.read(min_side=96).pixels)
        else:
            with Image.open(path) as opened:
                im = opened.convert("RGB")
        im.thumbnail((96, 96))
        return wandb.Image(im, caption=str(path))

    return table.assign(photo=[thumb(p) for p in table["photo"]])


def wandb_parent(parent: dict | None) -> str | None:
    """The W&B artifact reference ("name:latest") of a parent lineage dict, for Tracker.log_artifact."""
    return f"{parent['wandb_artifact']}:latest" if parent and parent.get("wandb_artifact") else None


class Tracker:
    """Logs metrics to `<out>/metrics.jsonl` and to a W&B run.

    Args:
        out_dir: the stage's output folder (metrics.jsonl goes there; W&B files under out_dir/wandb).
        mode: "offline" (default; no account or network needed; `wandb sync` uploads later),
            "online" or "disabled".
        project, entity, tags, name, job_type: W&B run fields.
        config: the resolved stage config (dict), stored with the run.
        run_id: resume this W&B run (pass the id stored in a checkpoint).
        enabled: False on non-zero ranks: nothing is logged or written.
    """

    def __init__(self, out_dir, *, mode="offline", project="finegrain", entity=None, tags=(), name=None,
                 job_type="train", config=None, run_id=None, enabled=True):
        if mode not in WANDB_MODES:
            from finegrain.errors import FinegrainError

            raise FinegrainError(f"--wandb must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.run = None
        self._warned = False
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")
        if mode == "disabled":
            return
        try:
            import wandb

            wandb_dir = self.out_dir / "wandb"
            wandb_dir.mkdir(exist_ok=True)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                mode=mode, project=project, entity=entity, tags=list(tags) or None, name=name,
                job_type=job_type, config=config, dir=str(self.out_dir), id=run_id,
                resume="allow" if run_id else None, reinit="finish_previous",
            )
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self._warn(f"W&B could not start ({type(e).__name__}: {e}); logging to metrics.jsonl only")

    @property
    def run_id(self) -> str | None:
        """The W&B run id, or None when W&B is not running."""
        return getattr(self.run, "id", None)

    def _warn(self, message: str) -> None:
        if not self._warned:
            log.warning(message)
            self._warned = True

    def log(self, metrics: dict, step: int | None = None) -> None:
        """Append one line {step, **metrics} to metrics.jsonl and log to W&B."""
        if not self.enabled:
            return
        line = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(line) + "\n")
        self._jsonl.flush()
        if self.run is not None:
            try:
                self.run.log(metrics, step=step)
            except Exception as e:  # noqa: BLE001
                self._warn(f"W&B logging failed ({type(e).__name__}: {e}); continuing with metrics.jsonl only")

    def summary(self, metrics: dict) -> None:
        """Set the run's summary values (final metrics)."""
        if self.run is not None:
            try:
                self.run.summary.update(metrics)
            except Exception as e:  # noqa: BLE001
                self._warn(f"W&B summary failed ({e})")

    def log_report(self, tables: dict, images: dict) -> None:
        """Log pandas DataFrames as W&B tables and PNG files (name -> path) as W&B images.

        Tables are what W&B shows best for per-class results (a confusion matrix table would
        have K^2 rows; the PNG is logged instead). A table's `photo` column (image files) is
        logged as small W&B images.
        """
        if self.run is None:
            return
        try:
            import wandb

            payload = {f"report/{k}": wandb.Table(dataframe=_with_thumbnails(v, wandb)) for k, v in tables.items()}
            payload.update({f"report/{k}": wandb.Image(str(v)) for k, v in images.items()})
            self.run.log(payload)
        except Exception as e:  # noqa: BLE001
            self._warn(f"W&B report logging failed ({type(e).__name__}: {e})")

    def use_dataset(self, manifest_file, *, name: str) -> None:
        """Declare the manifest as the run's input dataset (the first node of the W&B lineage graph).

        Online runs only: offline runs cannot `use_artifact`; the manifest hash in artifact.json
        records the same lineage locally.
        """
        if self.run is None or self.run.offline:
            return
        try:
            import wandb

            from finegrain.data.manifest import sidecar_path

            art = wandb.Artifact(name=name, type="dataset")
            art.add_file(str(manifest_file))
            if sidecar_path(manifest_file).is_file():  # a CSV manifest's root and hash
                art.add_file(str(sidecar_path(manifest_file)))
            self.run.use_artifact(art)
        except Exception as e:  # noqa: BLE001
            self._warn(f"W&B dataset logging failed ({type(e).__name__}: {e})")

    def log_artifact(self, folder, *, name: str, type: str, metadata: dict | None = None, parent: str | None = None) -> None:
        """Log a stage artifact folder; declare its parent (use_artifact) only when online.

        Offline runs cannot `use_artifact` (W&B raises), so lineage between stages always lives in
        artifact.json; the W&B graph edge is added when the run is online.
        """
        if self.run is None:
            return
        try:
            import wandb

            if parent and not self.run.offline:
                self.run.use_artifact(parent)
            art = wandb.Artifact(name=name, type=type, metadata=metadata or {})
            art.add_dir(str(folder))
            self.run.log_artifact(art)
        except Exception as e:  # noqa: BLE001
            self._warn(f"W&B artifact logging failed ({e.__class__.__name__}: {e})")  # `type` is the argument here

    def finish(self) -> None:
        """Close metrics.jsonl and the W&B run."""
        if not self.enabled:
            return
        self._jsonl.close()
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:  # noqa: BLE001
                self._warn(f"W&B finish failed ({e})")
            self.run = None
