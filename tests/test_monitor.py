"""The kNN monitor's bounded cost: a fixed class-balanced sample of photos, readings paced to a share of the time."""

from __future__ import annotations

import types

import pytest
import torch

from finegrain.config import TrainConfig
from finegrain.engine import loop
from finegrain.engine.loop import fit
from finegrain.eval import monitor as monitor_mod
from finegrain.eval.monitor import balanced_sample, knn_monitor

from test_engine import _cfg, _Images, _Tiny


def test_the_sample_is_bounded_balanced_and_the_same_each_time(birds):
    train = birds.rows("train")  # 4 species x 6 train photos
    sample = balanced_sample(train, 10, seed=0)
    counts = sample.table["label"].value_counts()
    assert len(sample) == 10 and counts.max() - counts.min() <= 1 and len(counts) == 4
    assert sample.table["path"].tolist() == balanced_sample(train, 10, seed=0).table["path"].tolist()
    assert sample.table["path"].tolist() != balanced_sample(train, 10, seed=1).table["path"].tolist()
    assert set(sample.table["path"]) <= set(train.table["path"])
    assert balanced_sample(train, 100, seed=0) is train  # small enough: every photo


def test_the_monitor_reads_only_its_sample(birds, monkeypatch):
    monkeypatch.setattr(monitor_mod, "MONITOR_GALLERY", 8)
    monkeypatch.setattr(monitor_mod, "MONITOR_QUERIES", 4)
    sizes = []
    real = monitor_mod.eval_dataset
    monkeypatch.setattr(monitor_mod, "eval_dataset", lambda cfg, rows, **kw: sizes.append(len(rows)) or real(cfg, rows, **kw))
    cfg = TrainConfig(image_size=32, workers=0, cache_images=False)
    data_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    knn = knn_monitor(cfg, birds, data_cfg, torch.device("cpu"), None)
    assert sizes == [8, 4] and len(birds.rows("train")) > 8
    backbone = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    metrics = knn(types.SimpleNamespace(training=False, eval=lambda: None, train=lambda mode: None, embed=backbone), 0)
    assert 0 <= metrics["knn_top1_test"] <= 1 and metrics["knn_chance"] == 1 / 4


class _Clock:
    """A fake perf_counter: a training step takes 1 s, a monitor reading 3 s."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.mark.parametrize("share", [0.1, 1.0])
def test_readings_are_paced_to_the_monitors_share_of_the_time(tmp_path, monkeypatch, share):
    clock = _Clock()
    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(_Tiny, "after_step", lambda self, step, total: setattr(clock, "now", clock.now + 1))
    read = []

    def monitor(method, epoch):
        read.append((epoch, clock.now))
        clock.now += 3
        return {"knn_top1_test": 0.5, "knn_chance": 0.5}

    result = fit(_Tiny(), _Images(), _cfg(epochs=10, knn_monitor_share=share), tmp_path, device=torch.device("cpu"),
                 base_lr=0.01, monitor=monitor)
    epochs = [e for e, _ in read]
    assert epochs[0] == 0 and epochs[-1] == 10  # the first and the last reading are always taken
    assert result.monitor_readings == len(read) and result.monitor_seconds == 3 * len(read)
    if share == 1.0:
        assert epochs == list(range(11))
        return
    # every reading between the first and the last kept the monitor (with that reading) within its share
    for i, (epoch, at) in enumerate(read[1:-1], start=1):
        assert 3 * (i + 1) <= share * (at + 3), (epoch, at)
    assert len(read) < 11
    assert (3 * len(read) - 3) / result.seconds <= share  # all but the forced last one within the share
