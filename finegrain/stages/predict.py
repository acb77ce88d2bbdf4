"""`finegrain predict`: species predictions for new photos from an artifact that holds a classifier.

With open-set scoring (artifacts from supcon that store it), photos unlike every trained species are
named `unknown` (eval/open_set.py: the artifact's unknown-species score, past its calibrated threshold).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

import pandas as pd
import torch

from finegrain.artifacts import Artifact, load_artifact
from finegrain.data.manifest import Manifest
from finegrain.data.validate import check_manifest_or_raise
from finegrain.engine.device import resolve_amp, resolve_device
from finegrain.errors import FinegrainError
from finegrain.eval.open_set import OpenSetReference
from finegrain.fsutil import atomic_write_text
from finegrain.runtime.runner import RunnerError, collect_photos

log = logging.getLogger("finegrain")

UNKNOWN = "unknown"  # pred_1 of a photo whose open-set score is past the threshold


def collect_images(inputs) -> list[Path]:
    """Image files named by `inputs` (files, or folders searched recursively), sorted, absolute."""
    try:
        return collect_photos(inputs)  # the runner's, so predict and the exported runner read the same photos
    except RunnerError as e:
        raise FinegrainError(str(e)) from None


def open_set_reference(artifact: Artifact, open_set: bool | None) -> OpenSetReference | None:
    """The artifact's open-set reference when `open_set` is True, or None (default: use it when stored).

    Raises:
        FinegrainError: `open_set` is True and the artifact stores none (an older or --no-classifier run).
    """
    stored = artifact.info.get("open_set")
    if open_set is False or (open_set is None and not stored):
        return None
    if not stored:
        raise FinegrainError(f"--open-set on: {artifact.path} stores no unknown-species calibration (trained before "
                             "open-set scoring, or without a val split or hold-out); retrain it with supcon, or use "
                             "--open-set off")
    return OpenSetReference.from_artifact(stored, artifact.state_dict())


def reading(info: dict):
    """How predict reads photos for an artifact's classifier (artifact.json `info`): the eval view recipe (resize,
    centre crop, normalise at the classifier's image size) and whether features are flip-averaged. `finegrain export`
    builds its graph from the same answer."""
    from finegrain.data.views import make_recipe

    fitted = info.get("classifier") or {}
    recipe = make_recipe("eval", image_size=fitted.get("image_size", info["image_size"]), mean=info["mean"],
                         std=info["std"])
    return recipe, bool(fitted.get("flip_tta", False))


def run_predict(artifact_dir, inputs, *, top_k: int = 5, out_csv=None, device: str = "auto", batch_size: int = 64,
                workers: int = 2, flip_tta: bool | None = None, open_set: bool | None = None,
                features_dir=None) -> pd.DataFrame:
    """Predict the top-k classes of each image with the artifact's backbone and linear classifier.

    Features are read as the classifier was fitted on them (its image size and flip averaging, stored
    in the artifact); `flip_tta` True/False overrides the flip averaging. They come from the shared
    features cache (features/store.py; `features_dir`, default the shared folder), so photos predicted
    before are neither checked nor decoded again.

    Returns (and writes to `out_csv` when given) one row per image: path, then pred_1..pred_k and
    score_1..score_k (softmax probabilities in [0, 1]); images that cannot be read get an `error`
    and no predictions. With open-set scoring (`open_set` True, or None and the artifact stores it),
    also nearest_species (the classifier's top species, whose probability is score_1), unknown_score
    (the artifact's open-set score, named in artifact.json under open_set.score: larger = less like any
    trained species) and known (unknown_score <= the stored threshold); pred_1 is then `unknown` for
    photos not known, pred_2.. stay the classifier's ranking.
    """
    artifact = load_artifact(artifact_dir)
    info = artifact.info
    head = artifact.state_dict("classifier.")
    if not head or not info.get("class_names"):
        raise FinegrainError(f"{artifact_dir} has no classifier ({info.get('stage')} artifact); predict needs a supcon artifact")
    if top_k < 1:
        raise FinegrainError("--top-k must be at least 1")
    reference = open_set_reference(artifact, open_set)
    classes = info["class_names"]
    top_k = min(top_k, len(classes))
    paths = collect_images(inputs)
    root = Path(os.path.commonpath([p.parent for p in paths]))
    names = [p.relative_to(root).as_posix() for p in paths]
    photos = Manifest(pd.DataFrame({"image_id": names, "path": names, "label": "", "split": "unlabeled"}), root)
    store = _feature_store(artifact, device, batch_size, workers, flip_tta, features_dir)
    manifest, errors = _readable(photos, store)

    rows = [{"path": str(p), "error": errors.get(str(p), "unreadable")} for p in paths]
    if len(manifest):
        feats = store.features(manifest, "predict")
        logits = torch.nn.functional.normalize(feats, dim=1) @ head["weight"].T.float() + head["bias"].float()
        predicted = _predictions(logits, feats, classes, top_k, reference)
        by_path = {str(root / p): {"path": str(root / p), **row} for p, row in zip(manifest.table["path"], predicted)}
        rows = [by_path.get(r["path"], r) for r in rows]
    df = pd.DataFrame(rows)
    cols = ["path"] + [f"pred_{j + 1}" for j in range(top_k)] + [f"score_{j + 1}" for j in range(top_k)]
    cols += ["nearest_species", "unknown_score", "known"] if reference is not None else []
    df = df.reindex(columns=cols + ["error"])
    if out_csv:
        atomic_write_text(Path(out_csv), df.to_csv(index=False))
    return df


def _feature_store(artifact: Artifact, device: str, batch_size: int, workers: int, flip_tta: bool | None,
                   features_dir):
    """The features cache of the artifact's backbone read as its classifier was fitted (image size, flip)."""
    from finegrain.config import FeatureConfig
    from finegrain.features.store import FeatureStore
    from finegrain.features.subject import Subject

    fitted = artifact.info.get("classifier") or {}
    cfg = FeatureConfig(from_artifact=str(artifact.path),
                        image_size=fitted.get("image_size", artifact.info["image_size"]),
                        flip_tta=fitted.get("flip_tta", False) if flip_tta is None else flip_tta,
                        batch_size=batch_size, workers=workers, device=device,
                        features_dir=None if features_dir is None else str(features_dir),
                        cache_images=False, on_bad_image="skip")  # photos are read once: no decoded-image cache
    dev = resolve_device(device)
    return FeatureStore(cfg, Subject(cfg), dev, amp_dtype=resolve_amp("auto", dev), file_stamps=True)


def _readable(photos: Manifest, store) -> tuple[Manifest, dict[str, str]]:
    """(the photos that can be read, absolute path -> why not for the others). Photos whose features the cache
    holds were read before; the others are checked (decoded), with a progress bar on a terminal."""
    held = store.held(photos)
    new = dataclasses.replace(photos, table=photos.table[~held].reset_index(drop=True))
    if not len(new):
        return photos, {}
    _, report = check_manifest_or_raise(new, on_bad_image="skip", progress=sys.stderr.isatty())
    errors = {str(photos.root / p.path): p.message for p in report.errors if p.path}
    for path, reason in list(errors.items())[:10]:
        log.warning("predict: cannot read %s (%s)", path, reason)
    if len(errors) > 10:
        log.warning("predict: %d more unreadable files (listed in the output)", len(errors) - 10)
    readable = ~photos.table["path"].isin({p.path for p in report.errors if p.path})
    return dataclasses.replace(photos, table=photos.table[readable].reset_index(drop=True)), errors


def _predictions(logits: torch.Tensor, feats: torch.Tensor, classes: list[str], top_k: int,
                 reference: OpenSetReference | None) -> list[dict]:
    """One output row (without path) per photo from its (C,) logits and (D,) features, in order."""
    prob, idx = logits.softmax(1).topk(top_k, dim=1)
    unknown = reference.scores(feats).tolist() if reference is not None else [None] * len(feats)
    rows = []
    for p, i, u in zip(prob.tolist(), idx.tolist(), unknown):
        row = {"error": ""}
        row.update({f"pred_{j + 1}": classes[c] for j, c in enumerate(i)})
        row.update({f"score_{j + 1}": round(s, 6) for j, s in enumerate(p)})
        if reference is not None:
            known = u <= reference.threshold
            row.update(nearest_species=row["pred_1"], unknown_score=round(u, 6), known=known)
            row["pred_1"] = row["pred_1"] if known else UNKNOWN
        rows.append(row)
    return rows
