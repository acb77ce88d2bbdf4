"""Pipelines: a YAML file names the data and the pretrain, supcon and evaluate stages; `run_pipeline` runs
them in order, each consuming the previous artifact, and skips a stage whose inputs are unchanged.

A pipeline file (all keys but `stages` optional):

    name: demo
    runs_dir: runs/demo                 # stage folders go here (relative to the current folder)
    data:
      manifest: data_manifests/cub50.csv          # an existing manifest, or
      demo: {out: demo/birds, classes: 12}        # synthetic birds (finegrain demo-data), or
      import: {kind: cub|folder|csv, root: ~/CUB_200_2011, out: data_manifests/cub200.parquet, ...}
      split: {val_fraction: 0.1, seed: 0}         # optional: hold out val from train [, label_fraction: 0.1]
    defaults: {image_size: 128, device: auto}     # applied to every stage that has the field
    stages:
      pretrain: {method: moco, epochs: 20}
      supcon: {loss: supcon, epochs: 10}
      distill: {unlabeled_batch_size: 64}       # optional: a student distils the artifact before it (--teacher)
      evaluate: {knn_k: 20}
    next:                               # optional: commands `finegrain run` suggests once the pipeline is done
      - finegrain import folder ~/photos/birds -o my_birds.csv

Stage options are the fields of the stage's config dataclass (the same names as the CLI flags).

Caching: a stage's folder is `runs_dir/<stage>-<key>`, where the key hashes the manifest's content,
the parent artifact's hash and the stage's resolved config. A folder with a complete artifact is
reused ("cached"); one with a checkpoint but no artifact is resumed; `force` reruns a stage from
scratch. Changing a supcon option therefore reruns supcon and evaluate, not pretrain.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from finegrain import dist
from finegrain.artifacts import ARTIFACT_FILE, load_artifact
from finegrain.config import config_from_dict
from finegrain.engine.checkpoint import CHECKPOINT_FILE
from finegrain.errors import FinegrainError
from finegrain.fsutil import atomic_write_text
from finegrain.stages import PIPELINE_STAGES

log = logging.getLogger("finegrain")

# The stages a pipeline names (finegrain.stages.PIPELINE_STAGES): name -> config class.
STAGES = {name: stage.config for name, stage in PIPELINE_STAGES.items()}
TOP_KEYS = {"name", "runs_dir", "data", "defaults", "stages", "description", "next"}
# Fields that change where or how fast a stage runs, not what it computes: left out of the cache key.
NOT_IN_KEY = {"out", "resume", "device", "workers", "cache_images", "cache_dir", "compile", "channels_last",
              "wandb", "wandb_project", "wandb_entity", "wandb_tags", "log_every", "checkpoint_every", "from_artifact", "manifest", "root",
              "divergence_guard", "keep_checkpoint", "knn_monitor_share"}


@dataclass
class StageResult:
    """One stage of a pipeline run: its folder, whether it was cached, and its artifact info."""

    stage: str
    path: Path
    status: str  # "cached", "ran", "resumed"
    info: dict


def load_pipeline(path, overrides=()) -> dict:
    """Read a pipeline YAML (safe loader) and apply `--set key.sub=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise FinegrainError(f"pipeline file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise FinegrainError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(spec, dict):
        raise FinegrainError(f"{path} must hold a mapping (name, data, stages, ...)")
    for item in overrides:
        if "=" not in item:
            raise FinegrainError(f"--set needs key=value (e.g. supcon.epochs=5), got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] in STAGES:
            parts = ["stages"] + parts
        node = spec
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FinegrainError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise FinegrainError(f"unknown key(s) in {path}: {', '.join(sorted(unknown))}; known: {', '.join(sorted(TOP_KEYS))}")
    stages = spec.get("stages") or {}
    if not isinstance(stages, dict) or not stages:
        raise FinegrainError(f"{path} names no stages (stages: pretrain / supcon / evaluate)")
    bad = set(stages) - set(STAGES)
    if bad:
        raise FinegrainError(f"unknown stage(s) {', '.join(sorted(bad))}; stages are {', '.join(STAGES)}")
    spec["stages"] = {name: dict(stages[name] or {}) for name in STAGES if name in stages}
    if not isinstance(spec.get("next", []), list) or not all(isinstance(c, str) for c in spec.get("next", [])):
        raise FinegrainError(f"{path}: next must be a list of commands (strings)")
    spec["_file"] = str(path)
    _check_stage_options(spec, path)
    return spec


def _check_stage_options(spec: dict, path: Path) -> None:
    """Build every stage's config once, so a wrong type, value or key stops here, before any work.

    A key under `defaults:` must be an option of at least one stage (it is applied to each stage that has it).
    """
    defaults = spec.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise FinegrainError(f"{path}: defaults must be a mapping of option: value")
    known = {f.name for cls in STAGES.values() for f in dataclasses.fields(cls)}
    unknown = sorted(set(defaults) - known)
    if unknown:
        close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        hints = "; ".join(f"did you mean {c[0]}?" for c in close.values() if c)
        raise FinegrainError(f"{path}: unknown option(s) under defaults: {', '.join(unknown)}; no stage has them"
                             + (f" ({hints})" if hints else ""))
    for name, options in spec["stages"].items():
        if not isinstance(options, dict):
            raise FinegrainError(f"{path}: stages.{name} must be a mapping of option: value")
        _stage_config(name, spec, Path(""), None, where=f"{path}: stages.{name}")


def prepare_data(spec: dict) -> Path:
    """The manifest the stages use: given, imported, or drawn (synthetic birds); then split if asked."""
    from finegrain.data.manifest import Manifest
    from finegrain.data.split import keep_label_fraction, split_manifest

    data = dict(spec.get("data") or {})
    sources = [k for k in ("manifest", "demo", "import") if k in data]
    if len(sources) != 1:
        raise FinegrainError("data: give exactly one of manifest, demo or import")
    if "manifest" in data:
        path = Path(data["manifest"])
    elif "demo" in data:
        from finegrain.data.synthetic import make_demo_dataset

        opts = dict(data["demo"] or {})
        out = Path(opts.pop("out", "demo/birds"))
        path = out / "manifest.csv"
        marker = out / ".demo-options.json"
        if not (path.is_file() and marker.is_file() and json.loads(marker.read_text()) == opts):
            make_demo_dataset(out, **opts)
            atomic_write_text(marker, json.dumps(opts, sort_keys=True))
        else:
            log.info("data: synthetic birds in %s (cached)", out)
    else:
        path = _import(dict(data["import"] or {}))
    if "split" in data:
        opts = dict(data["split"] or {})
        split_path = path.with_name(path.stem + "_split" + path.suffix)
        label_fraction = opts.pop("label_fraction", None)
        manifest = split_manifest(Manifest.load(path), **opts)
        if label_fraction is not None:
            manifest = keep_label_fraction(manifest, float(label_fraction), seed=int(opts.get("seed", 0)))
        if not split_path.is_file() or Manifest.load(split_path).content_hash != manifest.content_hash:
            manifest.save(split_path)
        path = split_path
    return path


def _import(opts: dict) -> Path:
    from finegrain.data import importers

    kind, out = opts.pop("kind", None), opts.pop("out", None)
    if kind not in ("cub", "folder", "csv") or not out or "root" not in opts and "file" not in opts:
        raise FinegrainError("data.import needs kind (cub, folder or csv), root (or file for csv) and out")
    out = Path(out)
    if not out.is_file():
        if kind == "cub":
            manifest = importers.import_cub(Path(opts["root"]).expanduser())
        elif kind == "folder":
            manifest = importers.import_folder(Path(opts["root"]).expanduser())
        else:
            manifest = importers.import_table(Path(opts.pop("file")).expanduser(), **opts)
        manifest.save(out)
    return out


def stage_key(stage: str, config, manifest_hash: str, parent_hash: str | None) -> str:
    """A short hash of what decides a stage's result: stage, config (less NOT_IN_KEY), manifest, parent."""
    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_IN_KEY}
    blob = json.dumps({"stage": stage, "config": values, "manifest": manifest_hash, "parent": parent_hash},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _stage_config(name: str, spec: dict, manifest: Path, parent: Path | None, where: str = ""):
    """The stage's checked config: `defaults` it has, then its own options, then the manifest and parent."""
    cls = STAGES[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in (spec.get("defaults") or {}).items() if k in fields}
    values.update(spec["stages"][name])
    values.update(manifest=str(manifest))
    if parent is not None:
        values["teacher" if name == "distill" else "from_artifact"] = str(parent)
    return config_from_dict(cls, copy.deepcopy(values), where=where or f"{spec['_file']}: stages.{name}")


def run_pipeline(spec: dict, *, force=(), runner=None) -> list[StageResult]:
    """Run (or reuse) each stage of `spec` in order; returns one StageResult per stage.

    force: stage names to rerun from scratch even when cached.
    runner: stage name -> run function (tests may wrap them); default the real stages.
    """
    from finegrain.engine.device import resolve_device

    runner = runner or {name: stage.run for name, stage in PIPELINE_STAGES.items()}
    bad = set(force) - set(STAGES)
    if bad:
        raise FinegrainError(f"--force names unknown stage(s) {', '.join(sorted(bad))}")
    device_type = resolve_device(str((spec.get("defaults") or {}).get("device", "auto"))).type
    owns_group = not dist.is_initialized() and dist.init_from_env(device_type)  # torchrun: every stage distributed
    try:
        return _run_stages(spec, force, runner)
    finally:
        if owns_group:
            dist.cleanup()


def _run_stages(spec: dict, force, runner) -> list[StageResult]:
    """run_pipeline's loop. Under torchrun rank 0 prepares the data and decides what is cached; every rank trains;
    evaluate runs on rank 0 while the others wait."""
    from finegrain.data.manifest import Manifest

    with _rank0_first():
        manifest_path = prepare_data(spec)
    manifest_hash = Manifest.load(manifest_path).content_hash
    runs_dir = Path(spec.get("runs_dir") or Path("runs") / (spec.get("name") or Path(spec["_file"]).stem))
    results: list[StageResult] = []
    parent: Path | None = None
    parent_hash: str | None = None
    for name in spec["stages"]:
        cfg = _stage_config(name, spec, manifest_path, parent)
        out = runs_dir / f"{name}-{stage_key(name, cfg, manifest_hash, parent_hash)}"
        cfg.out = str(out)
        status = dist.broadcast_object(_status(name, out, force) if dist.is_main() else None)
        if status == "cached":
            log.info("%s: cached (%s)", name, out)
        else:
            if hasattr(cfg, "resume"):
                cfg.resume = status == "resumed"
            log.info("%s: %s (%s)", name, "resuming" if status == "resumed" else "running", out)
            if name != "evaluate" or dist.is_main():
                runner[name](cfg)
            dist.barrier()  # the artifact is on disk before any rank reads it
        artifact = load_artifact(out)
        results.append(StageResult(name, out, status, artifact.info))
        if name != "evaluate":
            parent, parent_hash = out, artifact.hash
    if dist.is_main():
        atomic_write_text(runs_dir / "pipeline.json", json.dumps({
            "pipeline": spec["_file"], "manifest": str(manifest_path),
            "stages": [{"stage": r.stage, "path": str(r.path), "status": r.status} for r in results]}, indent=2) + "\n")
    return results


def _status(name: str, out: Path, force) -> str:
    """cached, resumed or ran, for the stage folder `out` (a forced stage's folder is removed first)."""
    if name in force and out.exists():
        shutil.rmtree(out)
    if (out / ARTIFACT_FILE).is_file():
        return "cached"
    return "resumed" if (out / CHECKPOINT_FILE).is_file() else "ran"


@contextlib.contextmanager
def _rank0_first():
    """Rank 0 runs the block first; the other ranks run it after (reading what rank 0 wrote). No-op alone."""
    if not dist.is_main():
        dist.barrier()
    yield
    if dist.is_main():
        dist.barrier()


def list_runs(folder) -> list[dict]:
    """Every complete artifact (and `finegrain export` folder, stage "export") under `folder`: path, stage, method,
    parent, manifest, headline metrics, created."""
    from finegrain.export import EXPORT_FILE

    rows = []
    for meta in sorted([*Path(folder).rglob(ARTIFACT_FILE), *Path(folder).rglob(EXPORT_FILE)]):
        try:
            info = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        metrics = info.get("metrics") or {}
        headline = {k: metrics[k] for k in ("knn_top1", "linear_top1", "recall_at_1", "map_at_r", "knn_top1_val",
                                            "knn_top1_test", "classifier_val_top1") if metrics.get(k) is not None}
        parent = info.get("parent") or {}
        rows.append({"path": str(meta.parent), "stage": info.get("stage"), "method": info.get("method"),
                     "backbone": info.get("backbone"), "parent": parent.get("path"), "manifest": info.get("manifest"),
                     "metrics": headline, "created": info.get("created")})
    return rows


def runs_tree(rows: list[dict]) -> list[dict]:
    """`list_runs` rows as a forest: each row gains `children` (the artifacts made from it, oldest first);
    returns the roots (artifacts whose parent is not among the rows), oldest first."""
    by_path = {str(Path(r["path"]).resolve()): {**r, "children": []} for r in rows}
    roots = []
    for node in sorted(by_path.values(), key=lambda r: (str(r["created"] or ""), r["path"])):
        parent = by_path.get(str(Path(node["parent"]).resolve())) if node["parent"] else None
        (parent["children"] if parent is not None and parent is not node else roots).append(node)
    return roots
