"""`finegrain pseudo-label`: name the unlabelled photos of a manifest from its labelled ones, on fixed features.

Features come from an artifact (`--from`) or a backbone's weights as they are, read as evaluate and
predict read photos (1.125 x the training size, flip-averaged) through the shared features cache.
curation/pseudo_labels.py names the 'unlabeled' rows (curriculum self-training with the linear probe,
class-balanced), with the number of rounds chosen on a held-out part of the labelled train photos;
photos the open-set score calls unknown species stay unnamed. The artifact holds the backbone as it
was read, the classifier refit on labelled + named photos (what `predict` answers), its open-set
calibration, PSEUDO_LABELS_FILE (every unlabelled photo: its label or none, confidence, open-set
score) and PSEUDO_MANIFEST_FILE (the manifest with the named photos in train, for `supcon` to train on).
`evaluate --from` it reports the classifier and kNN with the named photos in its gallery.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd
import torch

from finegrain.artifacts import Artifact
from finegrain.config import PseudoLabelConfig
from finegrain.curation.pseudo_labels import pseudo_label
from finegrain.errors import FinegrainError
from finegrain.eval.open_set import fit_open_set
from finegrain.features.extract import TEST_SIZE_SCALE, test_size
from finegrain.features.store import FeatureStore
from finegrain.features.subject import Subject
from finegrain.fsutil import atomic_write_text
from finegrain.stages.skeleton import stage_run

log = logging.getLogger("finegrain")

PSEUDO_LABELS_FILE = "pseudo_labels.csv"
PSEUDO_MANIFEST_FILE = "pseudo_manifest.csv"
DEFAULT_TRAIN_SIZE = 128  # without --from, features are read as a model trained at this side would be


def read_pseudo_labels(artifact: Artifact) -> pd.DataFrame | None:
    """The named photos of a pseudo-label artifact (path, label, confidence), or None for any other artifact."""
    name = artifact.info.get("pseudo_labels", {}).get("file") if artifact.info.get("pseudo_labels") else None
    if not name or not (artifact.path / name).is_file():
        return None
    table = pd.read_csv(artifact.path / name, keep_default_na=False)
    return table[table["label"].astype(str) != ""].reset_index(drop=True)


def run_pseudo_label(cfg: PseudoLabelConfig) -> Artifact:
    """Pseudo-label as `cfg` says; write the artifact to cfg.out and return it."""
    with stage_run("pseudo-label", cfg) as run:
        train, unlabelled, classes = _rows(cfg, run.manifest)
        read = dataclasses.replace(cfg, image_size=cfg.image_size or (None if cfg.from_artifact else
                                                                     test_size(DEFAULT_TRAIN_SIZE)))
        subject = Subject(read)
        if subject.artifact is not None:
            run.parent = subject.artifact.lineage()
        store = FeatureStore(read, subject, run.device, amp_dtype=run.amp_dtype)
        xl = store.features(train, "train").numpy()
        yl = train.class_codes(classes).numpy()
        xu = store.features(unlabelled, "unlabeled").numpy()
        run.track()
        found = pseudo_label(xl, yl, xu, num_classes=len(classes), rounds=cfg.rounds, balance=cfg.balance,
                             open_set_keep=cfg.open_set_keep, seed=cfg.seed)
        labelling, probe = found.labelling, found.probe
        named = labelling.labels >= 0
        open_set = fit_open_set(torch.from_numpy(np.concatenate([xl, xu[named]])),
                                torch.from_numpy(np.concatenate([yl, labelling.labels[named]])), seed=cfg.seed)
        table = pd.DataFrame({"path": unlabelled.table["path"],
                              "label": [classes[c] if c >= 0 else "" for c in labelling.labels],
                              "confidence": labelling.confidence.round(4),
                              "unknown_score": found.unknown_score.round(4), "known": found.allowed})
        atomic_write_text(run.out / PSEUDO_LABELS_FILE, table.to_csv(index=False))
        _write_manifest(run, table)
        state = {f"backbone.{k}": v for k, v in subject.model.state_dict().items()}
        state.update({"classifier.weight": torch.from_numpy(probe.weight), "classifier.bias": torch.from_numpy(probe.bias)})
        if open_set is not None:
            state.update(open_set.tensors())
        metrics = {"named": int(named.sum()), "named_fraction": float(named.mean()), "unlabelled": len(xu),
                   "held_top1_labels_only": found.held_top1_labels_only, "held_top1": found.held_top1}
        info = _info(cfg, subject, classes, found, open_set)
        log.info("pseudo-label: named %d of %d unlabelled photos (%d of %d rounds; held-out top-1 %s with them, %s on "
                 "the labels alone)", named.sum(), len(xu), labelling.rounds, cfg.rounds, _pct(found.held_top1),
                 _pct(found.held_top1_labels_only))
        return run.write(state, info, metrics)


def _info(cfg: PseudoLabelConfig, subject: Subject, classes: list[str], found, open_set) -> dict:
    """What artifact.json records: the model as read (image_size: the training side this reading belongs to), the
    classifier's reading (what predict and evaluate use), the open-set calibration and how the photos were named."""
    labelling = found.labelling
    return {"backbone": subject.name, "embedding_dim": int(subject.model.num_features),
            "image_size": int(round(subject.image_size / TEST_SIZE_SCALE)), "mean": list(subject.mean),
            "std": list(subject.std), "bbox_crop": cfg.bbox_crop, "class_names": classes,
            "classifier": {"input": "l2-normalised backbone features", "C": found.probe.C_reg,
                           "fitted_on": "train + pseudo-labelled", "image_size": subject.image_size,
                           "flip_tta": cfg.flip_tta},
            "open_set": open_set.info() if open_set else None,
            "pseudo_labels": {"file": PSEUDO_LABELS_FILE, "manifest": PSEUDO_MANIFEST_FILE,
                              "method": "curriculum self-training" + (", balanced" if cfg.balance else ""),
                              "rounds": labelling.rounds, "of": cfg.rounds, "chosen_on": found.chosen_on,
                              "history": labelling.history, "candidates": found.table},
            "weights_source": subject.weights_source}


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _rows(cfg: PseudoLabelConfig, manifest):
    """(labelled train rows, unlabelled rows, class names); bad input stops with what to run instead."""
    train, unlabelled = manifest.rows("train"), manifest.rows("unlabeled")
    classes = sorted(set(train.table["label"].astype(str)))
    if len(classes) < 2:
        raise FinegrainError(f"{cfg.manifest} has labelled train photos of {len(classes)} species: pseudo-labelling "
                             "needs labels of at least 2; label a few photos of each species first (`finegrain suggest "
                             f"--manifest {cfg.manifest} --from ARTIFACT -o next.csv` picks which)")
    if not len(unlabelled):
        raise FinegrainError(f"{cfg.manifest} has no unlabelled photos (rows with split 'unlabeled'): nothing to "
                             f"pseudo-label; with every photo labelled run `finegrain supcon --manifest {cfg.manifest} "
                             "--out DIR` instead")
    return train, unlabelled, classes


def _write_manifest(run, table: pd.DataFrame) -> None:
    """PSEUDO_MANIFEST_FILE: the run's manifest with each named unlabelled photo in train under its pseudo-label."""
    named = dict(zip(table["path"], table["label"]))
    t = run.manifest.table.copy()
    hit = (t["split"] == "unlabeled") & t["path"].map(lambda p: bool(named.get(p, "")))
    t.loc[hit, "label"] = t.loc[hit, "path"].map(named)
    t.loc[hit, "split"] = "train"
    dataclasses.replace(run.manifest, table=t).save(run.out / PSEUDO_MANIFEST_FILE)
