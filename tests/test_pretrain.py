"""`finegrain pretrain` end to end on the synthetic birds: real images, real training steps, real files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from finegrain.artifacts import load_artifact
from finegrain.cli import app
from finegrain.config import PretrainConfig
from finegrain.errors import FinegrainError
from finegrain.registry import PRETRAIN_METHODS
from finegrain.stages.pretrain import run_pretrain


def _cfg(birds, tmp_path, name="run", **kw):
    base = dict(manifest=str(birds.root / "manifest.csv"), out=str(tmp_path / name), backbone="test_efficientnet",
                weights="none", image_size=32, batch_size=8, epochs=2, workers=0, wandb="disabled",
                cache_dir=str(tmp_path / "cache"), optimizer="adamw", lr=2e-3, warmup_epochs=0.0, knn_monitor=False,
                proj_dim=32, proj_hidden=64)
    if kw.get("method") == "moco":
        base["queue_size"] = 64
    base.update(kw)
    return PretrainConfig(**base)


def _losses(out, after_step=0):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["train/loss"] for x in lines if "train/loss" in x and x["step"] > after_step]


@pytest.mark.parametrize("method", ["simclr", "moco", "byol", "simsiam"])
def test_writes_a_valid_artifact(birds, tmp_path, method):
    art = run_pretrain(_cfg(birds, tmp_path, method=method, knn_monitor=True))
    again = load_artifact(art.path)
    assert again.info["stage"] == "pretrain" and again.info["method"] == method
    assert again.info["manifest_hash"] == birds.content_hash
    assert again.info["embedding_dim"] == 256 and again.info["image_size"] == 32
    assert again.info["weights_source"] == "none" and again.info["mean"] == [0.485, 0.456, 0.406]
    assert 0.0 <= again.info["metrics"]["knn_top1_test"] <= 1.0
    keys = load_file(art.path / "model.safetensors").keys()
    assert any(k.startswith("backbone.") for k in keys) and any(k.startswith("head.") for k in keys)
    assert not any(k.startswith(("key_", "target_", "predictor")) for k in keys)
    assert (art.path / "config.yaml").is_file() and len(_losses(art.path)) >= 2
    with pytest.raises(FinegrainError, match="already holds a finished artifact"):
        run_pretrain(_cfg(birds, tmp_path, method=method))


@pytest.mark.parametrize("method", ["simclr", "moco", "byol", "simsiam"])
def test_loss_goes_down(birds, tmp_path, method):
    cfg = _cfg(birds, tmp_path, method=method, epochs=30, batch_size=12, lr=5e-3, log_every=1)
    art = run_pretrain(cfg)
    # MoCo's loss rises while its queue fills with real keys (harder negatives than the random
    # start); compare from the first step with a full queue on.
    full_queue = cfg.queue_size // (2 * cfg.batch_size) if method == "moco" else 0
    losses = _losses(art.path, after_step=full_queue)
    first, last = losses[: len(losses) // 4], losses[-len(losses) // 4:]
    assert sum(last) / len(last) < sum(first) / len(first), losses


class _Crash(Exception):
    pass


@pytest.mark.parametrize("method", ["simclr", "moco", "byol"])
def test_resume_ends_with_the_same_weights(birds, tmp_path, monkeypatch, method):
    kw = dict(method=method, epochs=2, checkpoint_every=3, workers=2)
    full = run_pretrain(_cfg(birds, tmp_path, "full", **kw))

    cls = PRETRAIN_METHODS.get(method)
    original = getattr(cls, "after_step", None)

    def crash_at_5(self, step, total):
        if original is not None:
            original(self, step, total)
        if step == 5:
            raise _Crash()

    monkeypatch.setattr(cls, "after_step", crash_at_5, raising=False)
    with pytest.raises(_Crash):
        run_pretrain(_cfg(birds, tmp_path, "cut", **kw))
    assert not (tmp_path / "cut" / "artifact.json").exists()
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.undo()
    with pytest.raises(FinegrainError, match="--resume"):
        run_pretrain(_cfg(birds, tmp_path, "cut", **kw))
    resumed = run_pretrain(_cfg(birds, tmp_path, "cut", resume=True, **kw))
    a, b = load_file(full.path / "model.safetensors"), load_file(resumed.path / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_loss_stops_with_a_clear_message(birds, tmp_path, monkeypatch):
    def nan_forward(self, views, labels=None):
        z = self.head(self.backbone(views[0]))
        return z.sum() * float("nan"), {}

    monkeypatch.setattr(PRETRAIN_METHODS.get("simclr"), "forward", nan_forward)
    with pytest.raises(FinegrainError, match="loss became nan"):
        run_pretrain(_cfg(birds, tmp_path))


def test_wandb_offline_run_is_written(birds, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    art = run_pretrain(_cfg(birds, tmp_path, epochs=1, wandb="offline"))
    assert list((art.path / "wandb").glob("offline-run-*")), list((art.path / "wandb").iterdir())
    assert art.info["wandb_run_id"]


def test_cli_pretrain(birds, tmp_path):
    r = CliRunner().invoke(app, ["pretrain", "--manifest", str(birds.root / "manifest.csv"), "-o", str(tmp_path / "p"),
                                 "--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32",
                                 "--batch-size", "8", "--epochs", "1", "--workers", "0", "--wandb", "disabled",
                                 "--cache-dir", str(tmp_path / "c"), "--no-knn-monitor", "--method", "moco", "--queue-size", "32"])
    assert r.exit_code == 0, r.output
    assert load_artifact(tmp_path / "p").info["method"] == "moco"
    r = CliRunner().invoke(app, ["pretrain", "--manifest", str(tmp_path / "none.csv"), "-o", str(tmp_path / "q")])
    assert r.exit_code == 2 and "not found" in r.output


def test_bf16_autocast_and_accumulation_on_cpu(birds, tmp_path):
    art = run_pretrain(_cfg(birds, tmp_path, amp="bf16", accumulate=2, batch_size=4, epochs=2, log_every=1))
    losses = _losses(art.path)
    # 24 images / (4 x 2 accumulated) = 3 optimizer steps per epoch.
    assert art.info["metrics"]["steps"] == 6 and len(losses) == 6
    assert all(l == l and l < 1e6 for l in losses)
    with pytest.raises(FinegrainError, match="fp16 needs a CUDA"):
        run_pretrain(_cfg(birds, tmp_path, "fp16", amp="fp16"))


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_hard_negative_beta_reaches_the_loss(birds, tmp_path, method):
    """Same seed, same first batch: beta 0 and beta 2 start from the same weights and differ only in the loss."""
    plain = _losses(run_pretrain(_cfg(birds, tmp_path, "plain", method=method, epochs=1, log_every=1)).path)
    hard = _losses(run_pretrain(_cfg(birds, tmp_path, "hard", method=method, epochs=1, log_every=1,
                                      hard_negative_beta=2.0)).path)
    assert len(plain) == len(hard) and plain[0] != hard[0]
    with pytest.raises(FinegrainError, match="hard_negative_beta: must be at least 0"):
        run_pretrain(_cfg(birds, tmp_path, "bad", method=method, epochs=1, hard_negative_beta=-1.0))


def _bn_keys(state):
    return [k for k in state if k.rsplit(".", 1)[-1] in ("running_mean", "running_var") and "bn" in k]


@pytest.mark.parametrize("method", ["moco", "byol"])
def test_freeze_bn_keeps_loaded_statistics_in_backbone_and_momentum_copy(birds, tmp_path, monkeypatch, method):
    from finegrain.models.backbone import create_backbone
    from finegrain.stages import skeleton
    from finegrain.methods import batchnorm_layers

    start = create_backbone("test_efficientnet").state_dict()
    torch.save(start, tmp_path / "start.pth")
    seen = {}
    real_fit = skeleton.fit

    def spy(model, *args, **kw):  # check the momentum copy's BatchNorm mode while training
        result = real_fit(model, *args, **kw)
        model.train()
        copy = model.key_backbone if method == "moco" else model.target_backbone
        seen["copy_bn_training"] = {bn.training for bn in batchnorm_layers(copy)}
        return result

    monkeypatch.setattr(skeleton, "fit", spy)
    frozen = run_pretrain(_cfg(birds, tmp_path, "frozen", method=method, weights=str(tmp_path / "start.pth"),
                               train_layers="all"))
    monkeypatch.undo()
    end = frozen.state_dict("backbone.")
    bn, conv = _bn_keys(start), [k for k in start if "conv" in k and k.endswith("weight")]
    assert bn and conv
    assert all(torch.equal(start[k], end[k]) for k in bn), "frozen BatchNorm statistics changed"
    assert any(not torch.equal(start[k], end[k]) for k in conv), "the backbone did not train"
    assert seen["copy_bn_training"] == {False}, "the momentum copy's BatchNorm was left in train mode"

    trained = run_pretrain(_cfg(birds, tmp_path, "trained", method=method, weights=str(tmp_path / "start.pth"),
                                freeze_bn=False, train_layers="all")).state_dict("backbone.")
    assert any(not torch.equal(start[k], trained[k]) for k in bn), "--no-freeze-bn left BatchNorm untouched"


def test_freeze_bn_is_ignored_for_random_initial_weights(birds, tmp_path):
    from finegrain.models.backbone import create_backbone

    art = run_pretrain(_cfg(birds, tmp_path, method="simclr", weights="none", freeze_bn=True))
    init = create_backbone("test_efficientnet").state_dict()  # timm's BatchNorm init: mean 0, var 1
    end = art.state_dict("backbone.")
    assert any(not torch.equal(init[k], end[k]) for k in _bn_keys(init)), "BatchNorm stayed at its random init"


def test_every_layer_at_the_default_lr_on_pretrained_weights_warns(birds, tmp_path, caplog):
    from finegrain.models.backbone import create_backbone

    torch.save(create_backbone("test_efficientnet").state_dict(), tmp_path / "start.pth")
    start = dict(method="simclr", weights=str(tmp_path / "start.pth"), epochs=1)
    with caplog.at_level("WARNING", logger="finegrain"):
        run_pretrain(_cfg(birds, tmp_path, "all", lr=None, train_layers="all", **start))
    assert any("base rate for training from scratch" in r.getMessage() for r in caplog.records)
    for name, options in (("default", dict(lr=None)), ("given", dict(train_layers="all"))):
        caplog.clear()
        with caplog.at_level("WARNING", logger="finegrain"):
            art = run_pretrain(_cfg(birds, tmp_path, name, **options, **start))
        assert not any("base rate for training from scratch" in r.getMessage() for r in caplog.records)
    config = load_artifact(tmp_path / "default").config()
    assert (config["resolved_train_layers"], config["resolved_views"]) == ("bn", "color_safe")
    assert art.config()["resolved_views"] == "color_safe"


@pytest.mark.parametrize("method,has_bn", [("moco", False), ("simclr", True), ("byol", True), ("simsiam", True)])
def test_projection_head_batchnorm_follows_each_paper(method, has_bn):
    """MoCo v2's projection MLP has no BatchNorm; SimCLR's, BYOL's and SimSiam's have it."""
    from finegrain.models.backbone import create_backbone

    cfg = PretrainConfig(method=method, proj_dim=8, proj_hidden=16)
    model = PRETRAIN_METHODS.get(method)(create_backbone("test_efficientnet"), cfg.method_options())
    bns = [m for m in model.head.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert bool(bns) == has_bn
    if method == "moco":
        assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.key_head.modules())


def test_a_finished_pretrain_run_keeps_no_checkpoint(birds, tmp_path):
    art = run_pretrain(_cfg(birds, tmp_path, epochs=1))
    assert not (art.path / "checkpoint.pt").exists()
