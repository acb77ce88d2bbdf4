"""The synthetic birds: files, manifest, determinism, and that classes differ only in small parts."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from finegrain.data.images import decode_image
from finegrain.data.manifest import Manifest
from finegrain.data.synthetic import ALL_SPECIES, Species, make_demo_dataset, render_bird, sample_nuisance
from finegrain.data.validate import validate_manifest
from finegrain.errors import FinegrainError


def test_dataset_files_and_manifest(tmp_path):
    m = make_demo_dataset(tmp_path / "d", classes=5, per_class=8, image_size=48, seed=1)
    assert len(m) == 40 and len(m.class_names) == 5
    assert m.split_counts() == {"train": 30, "test": 10}
    loaded = Manifest.load(tmp_path / "d" / "manifest.csv")
    assert loaded.content_hash == m.content_hash
    assert decode_image(loaded.root / loaded.table["path"][0]).pixels.shape == (48, 48, 3)
    assert validate_manifest(loaded).ok


def _digest(folder):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*.jpg")))).hexdigest()


def test_same_seed_same_files(tmp_path):
    make_demo_dataset(tmp_path / "a", classes=3, per_class=3, image_size=32, seed=5)
    make_demo_dataset(tmp_path / "b", classes=3, per_class=3, image_size=32, seed=5)
    make_demo_dataset(tmp_path / "c", classes=3, per_class=3, image_size=32, seed=6)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_classes_differ_in_small_parts_nuisance_in_large():
    rng = np.random.default_rng(0)
    base = Species("short", "red", False, False, "plain")
    variants = [Species("long", "red", False, False, "plain"), Species("short", "blue", False, False, "plain"),
                Species("short", "red", True, False, "plain"), Species("short", "red", False, True, "plain"),
                Species("short", "red", False, False, "spotted")]
    for _ in range(3):
        n1, n2 = sample_nuisance(rng), sample_nuisance(rng)
        ref = np.asarray(render_bird(base, n1, 96)).astype(int)
        nuisance_change = np.mean(np.abs(np.asarray(render_bird(base, n2, 96)).astype(int) - ref).max(-1) > 30)
        for v in variants:
            class_change = np.mean(np.abs(np.asarray(render_bird(v, n1, 96)).astype(int) - ref).max(-1) > 30)
            assert 0 < class_change < nuisance_change / 4, (v.name, class_change, nuisance_change)


def test_argument_checks(tmp_path):
    with pytest.raises(FinegrainError):
        make_demo_dataset(tmp_path, classes=len(ALL_SPECIES) + 1)
    with pytest.raises(FinegrainError):
        make_demo_dataset(tmp_path, per_class=1)
