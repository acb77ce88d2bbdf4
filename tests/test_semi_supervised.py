"""Few labels, many photos: pseudo-labels, distillation from a teacher artifact, the mixed batches, partial pretraining."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from finegrain.artifacts import load_artifact
from finegrain.cli import app
from finegrain.config import ConfigError, PretrainConfig, SupconConfig
from finegrain.data.manifest import Manifest
from finegrain.data.split import keep_label_fraction
from finegrain.engine.sampler import ClassBalancedSampler, EpochSampler, WithUnlabelled
from finegrain.errors import FinegrainError
from finegrain.losses import labelled_cross_entropy, soft_target_kl, supcon
from finegrain.methods import SupervisedMethod, train_only
from finegrain.methods.teachers import EmaTeacher, confident_labels
from finegrain.models.backbone import create_backbone
from finegrain.registry import SUPCON_LOSSES
from finegrain.stages.pretrain import run_pretrain
from finegrain.stages.supcon import run_supcon

from conftest import assert_resume_is_bit_exact, spawn_ranks


@pytest.fixture
def few_labels(birds) -> Manifest:
    """The synthetic birds with half of each species' train labels removed (split 'unlabeled')."""
    keep_label_fraction(birds, 0.5, seed=0).save(birds.root / "few.csv")
    return Manifest.load(birds.root / "few.csv")


def _cfg(manifest: Manifest, tmp_path, name, **kw):
    base = dict(manifest=str(manifest.root / "few.csv"), out=str(tmp_path / name), backbone="test_efficientnet",
                weights="none", image_size=32, batch_size=8, classes_per_batch=4, epochs=2, workers=0,
                wandb="disabled", cache_dir=str(tmp_path / "cache"), knn_monitor=False, log_every=1, proj_dim=16,
                proj_hidden=32, unlabeled_batch_size=4)
    return SupconConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------
# pure pieces: the confidence rule, the losses
# ---------------------------------------------------------------------------------------------


def test_pseudo_labels_follow_the_confidence_rule():
    probs = torch.tensor([[0.80, 0.15, 0.05], [0.40, 0.35, 0.25], [0.10, 0.20, 0.70], [0.05, 0.69, 0.26]])
    assert confident_labels(probs, 0.7).tolist() == [0, -1, 2, -1]
    assert confident_labels(probs, 0.3).tolist() == [0, 0, 2, 1]


class _Fixed(torch.nn.Module):
    """A classifier whose logits are the first C input features: (B, D) -> (B, C)."""

    def __init__(self, c: int):
        super().__init__()
        self.c = c
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x[:, :self.c] + 0 * self.dummy


def test_ema_teacher_names_only_confident_unlabelled_photos_and_averages_views():
    teacher = EmaTeacher(torch.nn.Flatten(), _Fixed(2), momentum=0.99, threshold=0.7)
    # 3 photos as "images" whose flattened pixels are the logits; photo 0 is labelled
    v1 = torch.tensor([[0.0, 0.0], [3.0, 0.0], [2.0, 0.0]]).view(3, 2, 1, 1)
    v2 = torch.tensor([[0.0, 0.0], [3.0, 0.0], [-2.0, 0.0]]).view(3, 2, 1, 1)  # photo 2's views disagree
    labels = torch.tensor([1, -1, -1])
    named, soft, metrics = teacher.targets([v1, v2], labels)
    p_conf = 1 / (1 + math.exp(-3.0))  # 0.95: photo 1 named class 0
    assert p_conf > 0.7
    assert named.tolist() == [1, 0, -1, 1, 0, -1] and soft is None  # photo 2: mean probability 0.5 < 0.7
    assert metrics["pseudo_labelled"].item() == pytest.approx(0.5)


def test_ema_teacher_ramps_its_momentum_like_mean_teacher():
    online = torch.nn.Linear(2, 2)
    teacher = EmaTeacher(online, torch.nn.Identity(), momentum=0.9, threshold=0.5)
    start = teacher.backbone.weight.clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    teacher.update(online, torch.nn.Identity(), step=1)  # momentum min(0.9, 1 - 1/2) = 0.5
    assert torch.allclose(teacher.backbone.weight, 0.5 * start + 0.5 * online.weight)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_soft_target_kl_against_a_plain_reference():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    for temp in (1.0, 2.0):
        expected = 0.0
        for i in range(5):
            p = [math.exp(x / temp) for x in t[i].tolist()]
            q = [math.exp(x / temp) for x in s[i].tolist()]
            p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
            expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        expected = expected / 5 * temp**2
        assert soft_target_kl(s, t, temp).item() == pytest.approx(expected, rel=1e-5)
    assert soft_target_kl(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_loss_on_a_tiny_batch_by_hand():
    """supcon_ce with a teacher: supcon(named) + ce_weight x (0.3 x CE(labelled) + 0.7 x KL(all rows))."""
    loss = SUPCON_LOSSES.get("supcon_ce")
    method = loss(create_backbone("test_efficientnet"), loss.Options(proj_dim=4, proj_hidden=8, label_smoothing=0.0),
                  num_classes=3)
    method.use_teacher(torch.nn.Identity(), distill_weight=0.7, distill_temperature=1.0)
    z = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.6, 0.8, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.8, 0.0, 0.6, 0.0]])
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 3.0], [0.5, 0.0, 0.0]])
    soft = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 0, -1, 1])  # row 2 unlabelled; row 3 has no positive
    terms = method.loss_terms((z, logits), labels, soft)

    def log_softmax(row):
        m = math.log(sum(math.exp(x) for x in row))
        return [x - m for x in row]

    ce = -(log_softmax([2.0, 0.0, 0.0])[0] + log_softmax([1.0, 1.0, 0.0])[0] + log_softmax([0.5, 0.0, 0.0])[1]) / 3
    kl = 0.0
    for s_row, t_row in zip(logits.tolist(), soft.tolist()):
        lq, lp = log_softmax(s_row), log_softmax(t_row)
        kl += sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))
    kl /= 4
    # supcon anchors 0 and 1 only (row 2 ignored, row 3 alone but a candidate): cosines 0-1 0.6, 0-3 0.8, 1-3 0.48
    e = lambda s: math.exp(s / 0.1)  # noqa: E731
    con = -(math.log(e(0.6) / (e(0.6) + e(0.8))) + math.log(e(0.6) / (e(0.6) + e(0.48)))) / 2
    assert terms["loss_ce"].item() == pytest.approx(0.3 * ce + 0.7 * kl, rel=1e-5)
    assert terms["loss_supcon"].item() == pytest.approx(con, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(con + 0.3 * ce + 0.7 * kl, rel=1e-5)
    assert labelled_cross_entropy(logits, labels).item() == pytest.approx(ce, rel=1e-5)


class _NamesEveryPhoto(torch.nn.Module):
    """A teacher that calls every unlabelled photo class 2."""

    def targets(self, views, labels):
        return torch.where(labels < 0, 2, labels).repeat(len(views)), None, {}


@pytest.mark.parametrize("pseudo_ce", [False, True])
def test_pseudo_labels_join_the_cross_entropy_only_when_asked(pseudo_ce):
    torch.manual_seed(0)
    loss = SUPCON_LOSSES.get("supcon_ce")
    method = loss(create_backbone("test_efficientnet"), loss.Options(proj_dim=4, proj_hidden=8, label_smoothing=0.0),
                  num_classes=3)
    method.use_teacher(_NamesEveryPhoto(), pseudo_ce=pseudo_ce)
    method.eval()
    views, labels = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)], torch.tensor([0, 1, -1, -1])
    _, metrics = method(views, labels)
    with torch.no_grad():
        z, logits = method.head(torch.cat([method.backbone(v) for v in views]))
    named = torch.tensor([0, 1, 2, 2]).repeat(2)
    ce_labels = named if pseudo_ce else labels.repeat(2)
    assert metrics["loss_ce"].item() == pytest.approx(labelled_cross_entropy(logits, ce_labels).item(), rel=1e-5)
    assert metrics["loss_supcon"].item() == pytest.approx(supcon(z, named, 0.1).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# the mixed batches
# ---------------------------------------------------------------------------------------------


def _mixed(rank=0, world=1, seed=1):
    labels = torch.arange(20) % 5
    return WithUnlabelled(ClassBalancedSampler(labels, 10, 5, seed=seed, rank=rank, world=world),
                          torch.arange(20, 120), 8, seed=seed, rank=rank, world=world)


def test_mixed_batches_cycle_the_labels_and_serve_each_unlabelled_photo_once_per_epoch():
    s = _mixed()
    assert s.batch_size == 18 and s.batches_per_epoch == 100 // 8  # an epoch is one pass over the larger pool
    s.set_epoch(0)
    order = list(s)
    batches = [order[i:i + 18] for i in range(0, len(order), 18)]
    rows = 120  # repeats come as row + k x 120: the dataset draws other augmentations for them
    assert all(all(i % rows < 20 for i in b[:10]) and all(i % rows >= 20 for i in b[10:]) for b in batches)
    unlabelled = [i for b in batches for i in b[10:]]
    assert len(unlabelled) == len(set(unlabelled)) == 96 and max(unlabelled) < rows
    labelled = [i for b in batches for i in b[:10]]
    assert {i % rows for i in labelled} == set(range(20))  # cycled through several labelled epochs
    assert len(set(labelled)) == len(labelled)  # ... each time as another item: fresh augmentations


def test_mixed_batches_resume_mid_epoch_and_split_across_ranks():
    s = _mixed()
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, 5)
    assert list(s) == full[5 * 18:]
    r0, r1 = _mixed(0, 2), _mixed(1, 2)
    r0.set_epoch(1)
    r1.set_epoch(1)
    a, b = list(r0), list(r1)
    assert len(a) == len(b) and not {i % 120 for i in a if i % 120 >= 20} & {i % 120 for i in b if i % 120 >= 20}


def test_a_plain_sampler_works_too():
    s = WithUnlabelled(EpochSampler(30, 6), torch.arange(30, 40), 2)
    s.set_epoch(0)
    assert len(list(s)) == s.batches_per_epoch * 8 == 5 * 8


# ---------------------------------------------------------------------------------------------
# the stage, end to end on the synthetic birds
# ---------------------------------------------------------------------------------------------


def test_pseudo_labels_train_and_write_an_artifact(few_labels, tmp_path):
    art = run_supcon(_cfg(few_labels, tmp_path, "pseudo", unlabeled="pseudo", pseudo_threshold=0.3))
    assert art.info["unlabeled"] == "pseudo" and art.info["class_names"] == few_labels.class_names
    lines = (art.path / "metrics.jsonl").read_text()
    assert '"train/pseudo_labelled"' in lines
    assert not any(k.startswith("teacher") for k in load_file(art.path / "model.safetensors"))


def test_distillation_from_a_teacher_artifact(few_labels, tmp_path):
    teacher = run_supcon(_cfg(few_labels, tmp_path, "teacher"))
    student = run_supcon(_cfg(few_labels, tmp_path, "student", teacher=str(teacher.path), loss="ce", proj_dim=None,
                              proj_hidden=None))
    assert student.info["unlabeled"] == "teacher" and student.info["teacher"] == str(teacher.path)
    lines = (student.path / "metrics.jsonl").read_text()
    assert '"train/loss"' in lines


def test_resume_with_pseudo_labels_is_bit_exact(few_labels, tmp_path, monkeypatch):
    kw = dict(unlabeled="pseudo", pseudo_threshold=0.3, epochs=3, checkpoint_every=2, workers=2, classifier=False)
    assert_resume_is_bit_exact(run_supcon, lambda name, **more: _cfg(few_labels, tmp_path, name, **kw, **more),
                               monkeypatch, SupervisedMethod, 3)


def test_bad_input_is_refused_before_training(birds, few_labels, tmp_path):
    runner = CliRunner()
    common = ["--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32", "--batch-size", "8",
              "--classes-per-batch", "4", "--wandb", "disabled", "--cache-dir", str(tmp_path / "cache")]
    r = runner.invoke(app, ["supcon", "--manifest", str(birds.root / "manifest.csv"), "--out", str(tmp_path / "x"),
                            "--unlabeled", "pseudo", *common])
    assert r.exit_code == 2 and "no unlabeled photos" in r.output and "Traceback" not in r.output
    teacher = run_supcon(_cfg(few_labels, tmp_path, "teacher", epochs=1))
    with pytest.raises(FinegrainError, match="trained at 32 px.*--image-size 32"):
        run_supcon(_cfg(few_labels, tmp_path, "s1", teacher=str(teacher.path), image_size=40))
    fewer = few_labels.table[few_labels.table["label"] != few_labels.class_names[0]]
    Manifest.from_table(fewer, few_labels.root).save(few_labels.root / "few.csv")  # one species less
    with pytest.raises(FinegrainError, match="knows 4 classes, this manifest's train split has 3"):
        run_supcon(_cfg(few_labels, tmp_path, "s2", teacher=str(teacher.path), classes_per_batch=2))
    assert not (tmp_path / "s1" / "checkpoint.pt").exists() and not (tmp_path / "s2" / "checkpoint.pt").exists()


def test_options_that_cannot_work_together_are_config_errors(few_labels, tmp_path):
    with pytest.raises(ConfigError, match="teacher: --teacher already uses"):
        _cfg(few_labels, tmp_path, "x", unlabeled="pseudo", teacher=str(tmp_path))
    with pytest.raises(ConfigError, match="unlabeled: needs a loss with a classifier"):
        _cfg(few_labels, tmp_path, "x", unlabeled="pseudo", loss="triplet")


# ---------------------------------------------------------------------------------------------
# pretrain: adapt part of the network
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", ["bn", "last"])
def test_train_layers_leave_the_other_weights_as_loaded(birds, tmp_path, layers):
    from safetensors.torch import save_file

    start = create_backbone("test_efficientnet").state_dict()
    save_file(start, str(tmp_path / "start.safetensors"))
    cfg = PretrainConfig(manifest=str(birds.root / "manifest.csv"), out=str(tmp_path / "p"), method="byol",
                         backbone="test_efficientnet", weights=str(tmp_path / "start.safetensors"), image_size=32,
                         batch_size=8, epochs=1, workers=0, wandb="disabled", cache_dir=str(tmp_path / "cache"),
                         knn_monitor=False, proj_dim=16, train_layers=layers, freeze_bn=False, lr=0.05)
    art = run_pretrain(cfg)
    after = load_artifact(art.path).state_dict("backbone.")
    bb = create_backbone("test_efficientnet")
    assert train_only(bb, layers) > 0
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    changed = {n for n in trainable if not torch.equal(start[n], after[n])}
    frozen = {n for n, _ in bb.named_parameters()} - trainable
    assert changed and all(torch.equal(start[n], after[n]) for n in frozen)


# ---------------------------------------------------------------------------------------------
# two gloo processes: the mixed loss gathers across ranks like one process
# ---------------------------------------------------------------------------------------------

_Y = torch.tensor([0, 0, -1, 1, 1, -1, 0, 1])  # global batch; each rank holds 3 named rows, all with a positive


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 4)


def _inputs():
    torch.manual_seed(1)
    return torch.randn(8, 6)


def _mixed_loss(model, x, y):
    z = model(x)
    return supcon(z, y, 0.2) + labelled_cross_entropy(z, y)


def _ddp_grads(rank: int) -> dict:
    model = torch.nn.parallel.DistributedDataParallel(_model())
    local = slice(4 * rank, 4 * rank + 4)
    _mixed_loss(model, _inputs()[local], _Y[local]).backward()
    return {"weight": model.module.weight.grad, "bias": model.module.bias.grad}


def test_two_process_mixed_loss_gradients_equal_the_single_process_ones(tmp_path):
    model = _model()
    _mixed_loss(model, _inputs(), _Y).backward()
    for res in spawn_ranks(_ddp_grads, 2, tmp_path):
        assert torch.allclose(res["weight"], model.weight.grad, atol=1e-6)
        assert torch.allclose(res["bias"], model.bias.grad, atol=1e-6)
