"""Features written to disk a batch at a time: the file is complete or absent, and a crash resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finegrain.config import EvaluateConfig
from finegrain.features import feature_file, store as store_module
from finegrain.features.feature_file import read_rows, rows_done, write_rows
from finegrain.features.store import FeatureStore
from finegrain.features.subject import Subject


class Killed(Exception):
    """Stands in for a process killed mid-extraction."""


def _batches(x: torch.Tensor, size: int, crash_after: int | None = None):
    for n, start in enumerate(range(0, len(x), size)):
        if crash_after is not None and n == crash_after:
            raise Killed
        yield x[start:start + size]


def test_write_rows_resumes_from_the_flushed_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(feature_file, "FLUSH_SECONDS", -1.0)  # flush after every batch
    x = torch.randn(23, 6)
    path = tmp_path / "train-abc.npy"
    with pytest.raises(Killed):
        write_rows(path, _batches(x, 5, crash_after=3), len(x))
    assert not path.exists() and rows_done(path, len(x)) == 15
    assert rows_done(path, len(x) + 1) == 0  # another photo set: start over
    write_rows(path, _batches(x[15:], 5), len(x), start=15)
    assert torch.equal(read_rows(path), x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-abc.npy"]
    out = read_rows(path)
    out += 1  # copy-on-write: the file keeps its rows
    assert torch.equal(torch.from_numpy(np.load(path)), x)


def test_a_crash_before_the_first_flush_starts_over(tmp_path):
    x = torch.randn(10, 3)
    path = tmp_path / "f.npy"
    with pytest.raises(Killed):
        write_rows(path, _batches(x, 4, crash_after=2), len(x))  # FLUSH_SECONDS not reached: nothing counted
    assert rows_done(path, len(x)) == 0
    write_rows(path, _batches(x, 4), len(x))
    assert torch.equal(read_rows(path), x)


def test_feature_store_resumes_an_interrupted_extraction(birds, tmp_path, monkeypatch):
    monkeypatch.setattr(feature_file, "FLUSH_SECONDS", -1.0)
    cfg = EvaluateConfig(manifest=str(birds.root / "manifest.csv"), out=str(tmp_path / "e"), backbone="test_efficientnet",
                         weights="none", image_size=32, workers=0, wandb="disabled", batch_size=4,
                         cache_dir=str(tmp_path / "cache"))
    subject = Subject(cfg)  # random weights: one model for the three stores
    whole = FeatureStore(cfg, subject, torch.device("cpu"), tmp_path / "whole").features(birds, "all")
    real = store_module.feature_batches

    def killed_after_three(*args, **kwargs):
        for n, batch in enumerate(real(*args, **kwargs)):
            if n == 3:
                raise Killed
            yield batch

    monkeypatch.setattr(store_module, "feature_batches", killed_after_three)
    store = FeatureStore(cfg, subject, torch.device("cpu"), tmp_path / "resumed")
    with pytest.raises(Killed):
        store.features(birds, "all")
    monkeypatch.setattr(store_module, "feature_batches", real)
    again = FeatureStore(cfg, subject, torch.device("cpu"), tmp_path / "resumed")
    resumed = again.features(birds, "all")
    assert again.extracted == len(birds) - 12 and resumed.shape == whole.shape
    assert torch.allclose(resumed, whole, atol=1e-5)


def test_photos_another_set_holds_are_copied_and_only_the_others_extracted(birds, tmp_path):
    cfg = EvaluateConfig(manifest=str(birds.root / "manifest.csv"), out=str(tmp_path / "e"), weights="none",
                         backbone="test_efficientnet", image_size=32, workers=0, wandb="disabled", batch_size=5,
                         cache_dir=str(tmp_path / "cache"))
    subject = Subject(cfg)
    whole = FeatureStore(cfg, subject, torch.device("cpu"), tmp_path / "fresh").features(birds, "all")
    store = FeatureStore(cfg, subject, torch.device("cpu"), tmp_path / "shared")
    test = store.features(birds.rows("test"), "test")
    assert store.extracted == len(test)
    mixed = store.features(birds, "all")  # test rows copied, train rows extracted, interleaved in manifest order
    assert store.extracted == len(birds) and torch.allclose(mixed, whole, atol=1e-5)
    again = FeatureStore(cfg, subject, torch.device("cpu"), tmp_path / "shared")
    train = torch.tensor((birds.table["split"] == "train").to_numpy())
    assert torch.allclose(again.features(birds.rows("train"), "train"), whole[train], atol=1e-5)
    assert again.extracted == 0  # a subset of a set already there: copied
