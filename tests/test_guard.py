"""The divergence guard: trips on a run made to diverge or collapse, never on a healthy one."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from finegrain.config import SupconConfig
from finegrain.engine.guard import DivergenceGuard
from finegrain.engine.loop import TrainingDiverged
from finegrain.stages.supcon import run_supcon


def _feed(guard, losses, accuracies=None):
    for step, loss in enumerate(losses, 1):
        reason = guard.check_step(step, loss, None if accuracies is None else accuracies[step - 1])
        if reason:
            return step, reason
    return None, None


def test_quiet_on_healthy_curves():
    rng = torch.Generator().manual_seed(0)
    noisy_fall = [4.0 * math.exp(-i / 40) + 0.3 * float(torch.rand(1, generator=rng)) for i in range(200)]
    assert _feed(DivergenceGuard(), noisy_fall) == (None, None)
    # MoCo: the loss rises a little while the queue fills with real keys
    assert _feed(DivergenceGuard(), [6.3 + 0.002 * i + 0.05 * (i % 3) for i in range(100)]) == (None, None)
    # BYOL/SimSiam: negative, small losses
    assert _feed(DivergenceGuard(), [-0.1 - 0.8 * (1 - math.exp(-i / 30)) + 0.01 * (i % 4) for i in range(100)]) == (None, None)
    # a loss converging towards 0 (each step read on CPU): small differences, not a stuck loss
    assert _feed(DivergenceGuard(), [1e-3 * math.exp(-i / 20) for i in range(100)]) == (None, None)
    # accuracy that rises and wobbles
    acc = [min(0.9, 0.02 * i) + 0.05 * (i % 2) for i in range(100)]
    assert _feed(DivergenceGuard(accuracy_chance=0.02), [3.0] * 0 + [3.0 - 0.01 * i + 0.01 * (i % 3) for i in range(100)],
                 acc) == (None, None)


def test_trips_on_a_loss_far_above_its_start():
    step, reason = _feed(DivergenceGuard(window=5), [4.5, 4.6, 4.4, 4.5, 4.7, 6.0, 12.0, 15.0, 20.0, 21.0, 25.0, 30.0])
    assert step is not None and "far above its start" in reason and f"step {step}" in reason


def test_trips_on_a_stuck_loss_and_on_accuracy_at_chance():
    step, reason = _feed(DivergenceGuard(), [5.0, 4.9, 4.8] + [math.log(127)] * 10)
    assert "stayed at 4.84419" in reason
    guard = DivergenceGuard(accuracy_chance=0.02, window=3)
    step, reason = _feed(guard, [4.0 + 0.1 * (i % 3) for i in range(12)], [0.1, 0.3, 0.5, 0.6, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert "train accuracy fell" in reason and step == 8


def test_knn_at_chance_trips_only_after_a_real_start():
    guard = DivergenceGuard()
    assert guard.check_monitor(0, 0, 0.60, 0.02) is None
    assert guard.check_monitor(1, 10, 0.62, 0.02) is None
    assert "collapsed" in guard.check_monitor(2, 20, 0.02, 0.02)
    from_scratch = DivergenceGuard()  # random init: kNN starts at chance, and staying there is no collapse
    assert from_scratch.check_monitor(0, 0, 0.03, 0.02) is None and from_scratch.check_monitor(1, 5, 0.02, 0.02) is None


@pytest.mark.slow
def test_a_collapsing_simclr_run_stops_before_its_collapse_is_saved(tmp_path):
    """SimCLR at lr 3 from ImageNet weights with frozen BatchNorm collapses: every image embeds to the
    same point and the loss sits at log(2B - 1). The run stops with the step and the reason; no
    artifact is written and the checkpoints written after the loss stuck are held back."""
    from finegrain.config import PretrainConfig
    from finegrain.data.synthetic import make_demo_dataset
    from finegrain.models.weights import BUILTIN_WEIGHTS
    from finegrain.stages.pretrain import run_pretrain

    if not BUILTIN_WEIGHTS["tf_efficientnet_lite0"].installed():
        pytest.skip("offline lite0 weights not installed")
    birds = make_demo_dataset(tmp_path / "birds", classes=8, per_class=16, image_size=96, seed=5)
    cfg = dict(manifest=str(birds.root / "manifest.csv"), image_size=64, batch_size=32, workers=0, wandb="disabled",
               cache_dir=str(tmp_path / "cache"), log_every=1, lr=3.0, epochs=8, knn_monitor=False, checkpoint_every=1,
               train_layers="all", views="simclr")  # every layer: the collapse this test needs
    with pytest.raises(TrainingDiverged, match=r"loss has stayed at 4\.143.*\(step (\d+)\)") as caught:
        run_pretrain(PretrainConfig(out=str(tmp_path / "run"), **cfg))
    stopped_at = int(caught.value.args[0].rsplit("(step ", 1)[1].split(")")[0])
    assert stopped_at < 8 * 3 and not (tmp_path / "run" / "artifact.json").exists()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {x["step"]: x["train/loss"] for x in lines if "train/loss" in x}
    assert abs(losses[stopped_at] - math.log(2 * 32 - 1)) < 1e-3
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"]
    # the checkpoint on disk predates the last three equal losses
    stuck_from = min(s for s in losses if all(abs(losses[t] - losses[stopped_at]) < 1e-3 for t in range(s, stopped_at + 1)))
    assert saved < stuck_from + 2, (saved, stuck_from)
    # The guard off: the same run finishes, stuck where it was.
    art = run_pretrain(PretrainConfig(out=str(tmp_path / "off"), divergence_guard=False, **cfg))
    assert abs(art.info["metrics"]["final_loss"] - math.log(63)) < 1e-3


def _cfg(birds, tmp_path, name, **kw):
    return SupconConfig(manifest=str(birds.root / "manifest.csv"), out=str(tmp_path / name), backbone="test_efficientnet",
                        weights="none", image_size=32, batch_size=8, classes_per_batch=4, workers=0, wandb="disabled",
                        cache_dir=str(tmp_path / "cache"), log_every=1, classifier=False, **kw)


def test_a_healthy_run_is_not_stopped(birds, tmp_path):
    art = run_supcon(_cfg(birds, tmp_path, "ok", epochs=6, knn_monitor=True))
    assert art.info["metrics"]["steps"] == 6 * 3
    assert load_file(art.path / "model.safetensors")
    lines = [json.loads(x) for x in (art.path / "metrics.jsonl").read_text().splitlines()]
    assert any("monitor/knn_chance" in x for x in lines)
