"""Stratified hold-out splits carved from a manifest's train split."""

from __future__ import annotations

import logging

import numpy as np

from finegrain.data.manifest import Manifest
from finegrain.errors import ManifestError

log = logging.getLogger("finegrain")


def split_manifest(manifest: Manifest, *, val_fraction: float = 0.1, test_fraction: float = 0.0, seed: int = 0) -> Manifest:
    """Move a stratified fraction of each class's train images to val (and optionally test).

    Written by hand rather than with scikit-learn's StratifiedShuffleSplit because fine-grained
    sets have classes with one or two images, which that splitter refuses; here every class keeps
    at least one training image, and a class with a single image stays entirely in train.

    Per class with n train images: round(n * test_fraction) go to test, then
    round(n * val_fraction) to val, both capped so that at least one stays in train. Rows in
    other splits are untouched. Deterministic for a given seed and manifest.

    Args:
        manifest: the manifest to split.
        val_fraction: fraction in [0, 1) of each class's train images moved to val.
        test_fraction: fraction in [0, 1) moved to test (for datasets that come without a test split).
        seed: random seed.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ManifestError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ManifestError("val_fraction + test_fraction must be below 1")
    table = manifest.table.copy()
    existing_val = int((table["split"] == "val").sum())
    if existing_val and val_fraction > 0:
        log.warning("split: the manifest already has %d val image(s); they stay val", existing_val)
    rng = np.random.default_rng(seed)
    train = table[table["split"] == "train"]
    if train.empty:
        raise ManifestError("split: the manifest has no train images to split")
    for _, rows in sorted(train.groupby("label"), key=lambda kv: kv[0]):
        idx = rows.index.to_numpy()[rng.permutation(len(rows))]
        n = len(idx)
        n_test = min(int(np.floor(n * test_fraction + 0.5)), n - 1)
        n_val = min(int(np.floor(n * val_fraction + 0.5)), n - 1 - n_test)
        table.loc[idx[:n_test], "split"] = "test"
        table.loc[idx[n_test:n_test + n_val], "split"] = "val"
    out = Manifest.from_table(table, manifest.root)
    log.info("split: %s", ", ".join(f"{k} {v}" for k, v in sorted(out.split_counts().items())))
    return out


def keep_label_fraction(manifest: Manifest, fraction: float, *, seed: int = 0) -> Manifest:
    """Keep the labels of a stratified fraction of each class's train images; the rest become unlabeled.

    Simulates "many photos, few labels": per class with n train images, max(1, round(n * fraction))
    keep their label and split; the others move to split "unlabeled" with an empty label, where
    `pretrain` still uses them and `supcon` / the linear probe / kNN do not. val and test rows are
    untouched. Deterministic for a given seed and manifest.

    Args:
        manifest: the manifest (labelled train rows).
        fraction: in (0, 1]; 1 keeps every label.
        seed: random seed.
    """
    if not 0.0 < fraction <= 1.0:
        raise ManifestError(f"label_fraction must be in (0, 1], got {fraction}")
    table = manifest.table.copy()
    train = table[table["split"] == "train"]
    if train.empty:
        raise ManifestError("label fraction: the manifest has no train images")
    rng = np.random.default_rng(seed)
    for _, rows in sorted(train.groupby("label"), key=lambda kv: kv[0]):
        idx = rows.index.to_numpy()[rng.permutation(len(rows))]
        keep = max(1, int(np.floor(len(idx) * fraction + 0.5)))
        table.loc[idx[keep:], ["split", "label"]] = ["unlabeled", ""]
    out = Manifest.from_table(table, manifest.root)
    log.info("label fraction %.3g: %s", fraction, ", ".join(f"{k} {v}" for k, v in sorted(out.split_counts().items())))
    return out
