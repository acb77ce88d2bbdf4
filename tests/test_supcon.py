"""`finegrain supcon` and `finegrain predict` end to end on the synthetic birds: real images, real steps, real files."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from finegrain.artifacts import load_artifact
from finegrain.cli import app
from finegrain.config import PretrainConfig, SupconConfig
from finegrain.errors import FinegrainError
from finegrain.methods import SupervisedMethod
from finegrain.methods.supervised import SupCon, SupConCE
from finegrain.registry import SUPCON_LOSSES
from finegrain.stages.predict import UNKNOWN, run_predict
from finegrain.stages.pretrain import run_pretrain
from finegrain.stages.supcon import run_supcon

from conftest import assert_resume_is_bit_exact


def _cfg(birds, tmp_path, name="run", **kw):
    base = dict(manifest=str(birds.root / "manifest.csv"), out=str(tmp_path / name), backbone="test_efficientnet",
                weights="none", image_size=32, batch_size=8, classes_per_batch=4, epochs=2, workers=0,
                wandb="disabled", cache_dir=str(tmp_path / "cache"), knn_monitor=False, log_every=1)
    if kw.get("loss") != "ce":  # ce has no projection head and refuses its options
        base.update(proj_dim=32, proj_hidden=64)
    base.update(kw)
    return SupconConfig(**base)


def _losses(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["train/loss"] for x in lines if "train/loss" in x]


@pytest.mark.parametrize("loss", ["supcon", "triplet", "contrastive", "ce", "supcon_ce"])
def test_writes_an_artifact_that_classifies(birds, tmp_path, loss):
    art = run_supcon(_cfg(birds, tmp_path, loss=loss, knn_monitor=True))
    again = load_artifact(art.path)
    info = again.info
    assert info["stage"] == "supcon" and info["method"] == loss
    assert info["class_names"] == birds.class_names and info["manifest_hash"] == birds.content_hash
    assert info["parent"] is None and info["weights_source"] == "none"
    weights = load_file(art.path / "model.safetensors")
    assert weights["classifier.weight"].shape == (len(birds.class_names), 256)
    assert weights["classifier.bias"].shape == (len(birds.class_names),)
    assert any(k.startswith("backbone.") for k in weights) and any(k.startswith("head.") for k in weights)
    if loss == "ce":
        assert weights["head.weight"].shape == (len(birds.class_names), 256)
    if loss == "supcon_ce":
        assert weights["head.classifier.weight"].shape == (len(birds.class_names), 256)
        assert any(k.startswith("head.projection.") for k in weights)
    assert 0 <= info["metrics"]["knn_top1_test"] <= 1
    assert info["classifier"]["C"] > 0
    # 24 labelled train images / batches of 8 = 3 steps per epoch.
    assert info["metrics"]["steps"] == 6 and len(_losses(art.path)) == 6


def test_starts_from_a_pretrain_artifact_and_records_lineage(birds, tmp_path):
    pre = run_pretrain(PretrainConfig(
        manifest=str(birds.root / "manifest.csv"), out=str(tmp_path / "pre"), backbone="test_efficientnet", weights="none",
        image_size=32, batch_size=8, epochs=1, workers=0, wandb="disabled", cache_dir=str(tmp_path / "cache"),
        knn_monitor=False, proj_dim=16))
    # A backbone name that differs from the artifact's is replaced by the artifact's.
    cfg = _cfg(birds, tmp_path, from_artifact=str(pre.path), backbone="resnet18", max_steps=1, head_warmup_epochs=1)
    art = run_supcon(cfg)
    assert art.info["parent"]["hash"] == pre.hash and art.info["parent"]["stage"] == "pretrain"
    assert art.info["backbone"] == "test_efficientnet"
    # One head-only step: the backbone still holds the pretrained weights exactly.
    before, after = pre.state_dict("backbone."), art.state_dict("backbone.")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_head_warmup_then_backbone_trains_with_frozen_batchnorm(birds, tmp_path):
    from finegrain.models.backbone import create_backbone

    start = create_backbone("test_efficientnet").state_dict()
    torch.save(start, tmp_path / "start.pth")
    art = run_supcon(_cfg(birds, tmp_path, weights=str(tmp_path / "start.pth"), head_warmup_epochs=1, epochs=3))
    end = art.state_dict("backbone.")
    bn = [k for k in start if "bn" in k and k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "weight", "bias")]
    conv = [k for k in start if "conv" in k and k.endswith("weight")]
    assert bn and conv
    assert all(torch.equal(start[k], end[k]) for k in bn), "frozen BatchNorm changed"
    assert any(not torch.equal(start[k], end[k]) for k in conv), "the backbone never trained after the warm-up"

    trainable = run_supcon(_cfg(birds, tmp_path, "bn", weights=str(tmp_path / "start.pth"), freeze_bn=False))
    end = trainable.state_dict("backbone.")
    assert any(not torch.equal(start[k], end[k]) for k in bn), "--no-freeze-bn left BatchNorm untouched"


def test_backbone_learning_rate_is_scaled(birds, tmp_path):
    from finegrain.stages.supcon import _param_groups

    cfg = _cfg(birds, tmp_path, backbone_lr_scale=0.1, weight_decay=1e-4)
    from finegrain.models.backbone import create_backbone

    method = SUPCON_LOSSES.get("supcon")(create_backbone("test_efficientnet"), SupCon.Options(proj_dim=8), num_classes=4)
    groups = _param_groups(method, cfg)
    head = {id(p) for p in method.head.parameters()}
    for g in groups:
        in_head = {id(p) in head for p in g["params"]}
        assert len(in_head) == 1
        assert g["lr_scale"] == (1.0 if in_head.pop() else 0.1)
    n_grouped = sum(len(g["params"]) for g in groups)
    assert n_grouped == sum(1 for p in method.parameters() if p.requires_grad)

    # timm layer-wise decay: earlier backbone blocks get smaller rates, none above backbone_lr_scale
    decayed = _param_groups(method, _cfg(birds, tmp_path, backbone_lr_scale=0.1, layer_decay=0.5))
    scales = sorted({g["lr_scale"] for g in decayed if not {id(p) for p in g["params"]} & head})
    assert len(scales) > 2 and max(scales) <= 0.1 + 1e-12 and min(scales) < 0.1 * 0.5 ** 2
    stem = next(p for n, p in method.backbone.named_parameters() if n.startswith("conv_stem"))
    assert next(g["lr_scale"] for g in decayed if any(p is stem for p in g["params"])) == min(scales)


def test_supcon_loss_goes_down(birds, tmp_path):
    art = run_supcon(_cfg(birds, tmp_path, epochs=12, head_warmup_epochs=0, freeze_bn=False, optimizer="adamw", lr=3e-3,
                          backbone_lr_scale=1.0, warmup_epochs=0))
    losses = _losses(art.path)
    first, last = losses[: len(losses) // 4], losses[-len(losses) // 4:]
    assert sum(last) / len(last) < sum(first) / len(first), losses


def test_resume_with_the_class_balanced_sampler_ends_with_the_same_weights(birds, tmp_path, monkeypatch):
    kw = dict(epochs=2, checkpoint_every=2, workers=2, classifier=False)
    assert_resume_is_bit_exact(run_supcon, lambda name, **more: _cfg(birds, tmp_path, name, **kw, **more), monkeypatch,
                               SupervisedMethod, 4)


def test_bad_options_are_clear_errors(birds, tmp_path):
    with pytest.raises(FinegrainError, match="loss: unknown supcon loss 'arcface'"):
        run_supcon(_cfg(birds, tmp_path, loss="arcface"))
    with pytest.raises(FinegrainError, match="multiple of classes_per_batch"):
        run_supcon(_cfg(birds, tmp_path, batch_size=8, classes_per_batch=3))
    with pytest.raises(FinegrainError, match="not a complete artifact|not found"):
        run_supcon(_cfg(birds, tmp_path, from_artifact=str(tmp_path)))


def test_predict_names_species_and_reports_unreadable_files(birds, tmp_path):
    art = run_supcon(_cfg(birds, tmp_path, epochs=1))
    folder = birds.root / "images"
    (folder / "broken.jpg").write_text("not an image")
    df = run_predict(art.path, [folder], top_k=3, out_csv=tmp_path / "p.csv", workers=0)
    written = pd.read_csv(tmp_path / "p.csv")
    assert len(df) == len(written) == len(birds) + 1
    broken = written[written["path"].str.endswith("broken.jpg")]
    assert len(broken) == 1 and isinstance(broken["error"].iloc[0], str) and pd.isna(broken["pred_1"].iloc[0])
    good = written[written["error"].isna()]
    assert set(good["pred_1"]) <= set(birds.class_names) | {UNKNOWN}  # open-set scoring is on by default
    assert set(good["nearest_species"]) <= set(birds.class_names)
    scores = good[["score_1", "score_2", "score_3"]].to_numpy()
    assert (scores[:, :-1] >= scores[:, 1:]).all() and (scores.sum(1) <= 1 + 1e-5).all() and (scores > 0).all()
    with pytest.raises(FinegrainError, match="no classifier"):
        pre_like = tmp_path / "noclf"
        run_supcon(_cfg(birds, tmp_path, "noclf", epochs=1, classifier=False))
        run_predict(pre_like, [folder])


def test_predict_reads_features_as_the_classifier_was_fitted(birds, tmp_path, monkeypatch):
    """The classifier is fitted at the test size with flip averaging; predict reads photos the same way."""
    import finegrain.data.dataset as dataset

    art = run_supcon(_cfg(birds, tmp_path, epochs=1))
    assert art.info["classifier"]["image_size"] == 36 and art.info["classifier"]["flip_tta"] is True  # 1.125 x 32
    sizes = []
    make_recipe = dataset.make_recipe
    monkeypatch.setattr(dataset, "make_recipe", lambda *a, **kw: sizes.append(kw["image_size"]) or make_recipe(*a, **kw))
    folder = birds.root / "images"
    default = run_predict(art.path, [folder], top_k=1, workers=0)
    flipped = run_predict(art.path, [folder], top_k=1, workers=0, flip_tta=True)
    plain = run_predict(art.path, [folder], top_k=1, workers=0, flip_tta=False)
    assert sizes == [36, 36]  # the second run's features (flip averaged, as the default) come from the cache
    assert default["score_1"].equals(flipped["score_1"]) and not default["score_1"].equals(plain["score_1"])


def test_cli_supcon_and_predict(birds, tmp_path):
    r = CliRunner().invoke(app, ["supcon", "--manifest", str(birds.root / "manifest.csv"), "-o", str(tmp_path / "s"),
                                 "--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32",
                                 "--batch-size", "8", "--classes-per-batch", "4", "--epochs", "1", "--workers", "0",
                                 "--wandb", "disabled", "--cache-dir", str(tmp_path / "c"), "--no-knn-monitor",
                                 "--loss", "triplet", "--margin", "0.3"])
    assert r.exit_code == 0, r.output
    assert load_artifact(tmp_path / "s").info["method"] == "triplet"
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "s"), str(birds.root / "images"), "--top-k", "2", "--workers", "0"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["supcon", "--manifest", str(birds.root / "manifest.csv"), "-o", str(tmp_path / "t"),
                                 "--from", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "not found" in r.output


def test_supcon_ce_is_supcon_plus_weighted_cross_entropy():
    import torch.nn.functional as F

    from finegrain.losses.supcon import supcon
    from finegrain.models.backbone import create_backbone

    torch.manual_seed(0)
    options = SupConCE.Options(proj_dim=16, proj_hidden=32, temperature=0.1, label_smoothing=0.1, ce_weight=0.7)
    method = SupConCE(create_backbone("test_efficientnet"), options, num_classes=3, freeze_bn=True).eval()
    views = [torch.randn(6, 3, 32, 32) for _ in range(2)]
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss, metrics = method(views, labels)
    with torch.no_grad():
        features = torch.cat([method.backbone(v) for v in views])
        z, logits = method.head.projection(features), method.head.classifier(features)
    y = labels.repeat(2)
    expected = supcon(z, y, temperature=0.1) + 0.7 * F.cross_entropy(logits, y, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    assert 0 <= float(metrics["accuracy"]) <= 1


@pytest.mark.parametrize("loss", ["ce", "supcon_ce"])
def test_ce_temperature_reaches_the_classifier(loss):
    """The classifier's logits are cosines / ce_temperature: a different temperature gives other logits."""
    from finegrain.models.backbone import create_backbone

    torch.manual_seed(0)
    views, labels = [torch.randn(4, 3, 32, 32)], torch.tensor([0, 1, 2, 0])
    logits = {}
    for t in (0.05, 0.5):
        cfg = SupconConfig(loss=loss, ce_temperature=t, batch_size=8, classes_per_batch=4)
        torch.manual_seed(1)
        method = SUPCON_LOSSES.get(loss)(create_backbone("test_efficientnet"), cfg.method_options(), num_classes=3).eval()
        features = method.backbone(views[0])
        out = method.head(features)
        logits[t] = method.logits(out)
        assert logits[t].abs().max() <= 1 / t + 1e-4
    torch.testing.assert_close(logits[0.05] * 0.05, logits[0.5] * 0.5, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits[0.05], logits[0.5])


def test_wise_ft_mixes_the_fine_tuned_and_starting_backbones(birds, tmp_path):
    """--wise-ft 0.5: the artifact's backbone is halfway between the starting and the fine-tuned weights."""
    from finegrain.models.backbone import create_backbone

    torch.manual_seed(0)
    start = create_backbone("test_efficientnet").state_dict()
    torch.save(start, tmp_path / "start.pth")
    kw = dict(weights=str(tmp_path / "start.pth"), head_warmup_epochs=0, epochs=2, classifier=False, freeze_bn=False)
    tuned = run_supcon(_cfg(birds, tmp_path, "tuned", **kw)).state_dict("backbone.")
    mixed = run_supcon(_cfg(birds, tmp_path, "mixed", wise_ft=0.5, **kw)).state_dict("backbone.")
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], tuned[k])]
    assert moved
    for k in moved:
        torch.testing.assert_close(mixed[k], 0.5 * (start[k] + tuned[k]), rtol=1e-5, atol=1e-6)


def test_a_finished_run_keeps_no_checkpoint_unless_asked(birds, tmp_path):
    art = run_supcon(_cfg(birds, tmp_path, "plain", epochs=1))
    assert (art.path / "model.safetensors").is_file() and not (art.path / "checkpoint.pt").exists()
    with pytest.raises(FinegrainError, match="nothing to resume"):  # a resume of a finished run says so
        run_supcon(_cfg(birds, tmp_path, "plain", epochs=1, resume=True))
    kept = run_supcon(_cfg(birds, tmp_path, "kept", epochs=1, keep_checkpoint=True))
    assert torch.load(kept.path / "checkpoint.pt", weights_only=True)["step"] == kept.info["metrics"]["steps"]
