"""The training loop (`finegrain.engine.loop.fit`) on a tiny method and tensors: gradient accumulation
under DDP (2 gloo processes), non-finite losses and the last good checkpoint, resume with accumulation."""

from __future__ import annotations

import contextlib
import logging
import functools

import pytest
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from finegrain.config import TrainConfig
from finegrain.engine import loop
from finegrain.engine.loop import FitResult, TrainingDiverged, fit
from finegrain.methods.base import BackboneMethod

from conftest import spawn_ranks

N_IMAGES = 20


class _Images(torch.utils.data.Dataset):
    """N_IMAGES fixed (3, 2, 2) images with a regression target each; (views, label, index) like ManifestDataset."""

    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(N_IMAGES, 3, 2, 2, generator=g)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return N_IMAGES

    def __getitem__(self, i):
        return [self.x[i]], i % 2, i


class _Tiny(BackboneMethod):
    """Linear regression of the pixel mean; logs every forward call in `events` ("f"); NaN loss from call `nan_from`."""

    def __init__(self, events: list | None = None, *, dropout: float = 0.0, nan_from: int | None = None):
        torch.manual_seed(0)
        super().__init__(nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(12, 1)))
        self.events = events if events is not None else []
        self.nan_from, self.calls = nan_from, 0

    def forward(self, views, labels):
        self.calls += 1
        self.events.append("f")
        x = views[0]
        loss = ((self.backbone(x).squeeze(1) - x.mean(dim=(1, 2, 3))) ** 2).mean()
        if self.nan_from is not None and self.calls >= self.nan_from:
            loss = loss * float("nan")
        return loss, {"calls": float(self.calls)}


def _cfg(**kw) -> TrainConfig:
    base = dict(batch_size=2, epochs=2, accumulate=1, optimizer="sgd", weight_decay=0.0, warmup_epochs=0.0, amp="off",
                channels_last=False, workers=0, log_every=1, checkpoint_every=0, seed=0, wandb="disabled")
    base.update(kw)
    return TrainConfig(**base)


def _weights(method: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


@contextlib.contextmanager
def _recording_ddp(events: list):
    """Log DDP's no_sync entries ("n") and gradient all-reduces ("r", one bucket for the tiny model) in `events`."""
    original_init, original_no_sync = DistributedDataParallel.__init__, DistributedDataParallel.no_sync

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)

        def hook(state, bucket):
            events.append("r")
            return default_hooks.allreduce_hook(None, bucket)

        self.register_comm_hook(None, hook)

    @contextlib.contextmanager
    def no_sync(self):
        events.append("n")
        with original_no_sync(self):
            yield

    DistributedDataParallel.__init__, DistributedDataParallel.no_sync = init, no_sync
    try:
        yield
    finally:
        DistributedDataParallel.__init__, DistributedDataParallel.no_sync = original_init, original_no_sync


def _ddp_rank(rank: int, out_dir: str) -> dict:
    """One of 2 gloo ranks: batches of 2 per rank, accumulate 2 (run by spawn_ranks)."""
    events: list[str] = []
    method = _Tiny(events)
    with _recording_ddp(events):
        result = fit(method, _Images(), _cfg(batch_size=2, accumulate=2), out_dir, device=torch.device("cpu"), base_lr=0.1)
    return {"events": "".join(events), "steps": result.steps, "weights": _weights(method)}


# 20 images, batches of 2 x 2 ranks: 5 micro-batches an epoch, 2 optimizer steps of 2 micro-batches each (the
# fifth is left over: no step, its gradient dropped); 2 epochs = 4 steps, the last epoch stopping after step 4.
# "nf": forward in no_sync (no all-reduce); "fr": forward then the gradient all-reduce of an optimizer step.
DDP_EVENTS = "nf fr nf fr nf" + " nf fr nf fr"


def test_ddp_accumulation_all_reduces_only_on_the_last_micro_step(tmp_path):
    ranks = spawn_ranks(functools.partial(_ddp_rank, out_dir=str(tmp_path / "ddp")), 2, tmp_path, 180)
    for res in ranks:
        assert res["events"] == DDP_EVENTS.replace(" ", "") and res["steps"] == 4
    for k, v in ranks[0]["weights"].items():
        assert torch.equal(v, ranks[1]["weights"][k]), k

    # One process on the same global batches (4 images, the two ranks' halves): no DDP, no no_sync, and the
    # same weights: the no_sync micro-steps' gradients were kept and averaged with the others.
    events: list[str] = []
    method = _Tiny(events)
    with _recording_ddp(events):
        result = fit(method, _Images(), _cfg(batch_size=4, accumulate=2), tmp_path / "one", device=torch.device("cpu"),
                     base_lr=0.1)
    assert "".join(events) == "f" * 9 and result.steps == 4
    for k, v in _weights(method).items():
        assert torch.allclose(v, ranks[0]["weights"][k], atol=1e-6), k


@pytest.mark.parametrize("check_every_step", [True, False], ids=["cpu-checks-each-step", "deferred-checks-as-on-cuda"])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, check_every_step):
    monkeypatch.setattr(loop, "_check_every_step", lambda device: check_every_step)
    method = _Tiny(nan_from=4)  # micro-batch 4 = step 4's only one
    with pytest.raises(TrainingDiverged, match="the loss became nan") as err:
        fit(method, _Images(), _cfg(checkpoint_every=2, log_every=100), tmp_path, device=torch.device("cpu"), base_lr=0.1)
    assert "The last good checkpoint is kept in" in str(err.value)
    if check_every_step:  # stopped before the backward: the weights in memory are still good
        assert "at step 3 (epoch 0)" in str(err.value)
        assert all(torch.isfinite(v).all() for v in method.state_dict().values())
    else:  # read before the step-4 checkpoint: the weights are damaged, but not saved
        assert "between step 2 and step 4 (epoch 0)" in str(err.value)
        assert not torch.isfinite(method.backbone[2].weight).all()
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["method"].values())


class _Crash(Exception):
    pass


@pytest.mark.parametrize("ema_decay", [0.0, 0.9], ids=["no-ema", "ema"])
def test_resume_with_accumulation_gives_the_same_weights(tmp_path, monkeypatch, ema_decay):
    # 5 steps of 2 micro-batches an epoch; checkpoints after steps 3, 5 (epoch end), 6; killed after step 8
    cfg = dict(accumulate=2, checkpoint_every=3, optimizer="adamw", warmup_epochs=0.5, ema_decay=ema_decay)
    full = _Tiny(dropout=0.3)
    result = fit(full, _Images(), _cfg(**cfg), tmp_path / "full", device=torch.device("cpu"), base_lr=0.01)
    assert isinstance(result, FitResult) and result.steps == 10 and isinstance(result.last_loss, float)

    def crash_at_8(self, step, total):
        if step == 8:
            raise _Crash()

    monkeypatch.setattr(_Tiny, "after_step", crash_at_8)
    with pytest.raises(_Crash):
        fit(_Tiny(dropout=0.3), _Images(), _cfg(**cfg), tmp_path / "cut", device=torch.device("cpu"), base_lr=0.01)
    monkeypatch.undo()
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 6  # mid-epoch 1
    resumed = _Tiny(dropout=0.3)
    again = fit(resumed, _Images(), _cfg(resume=True, **cfg), tmp_path / "cut", device=torch.device("cpu"), base_lr=0.01)
    assert again.steps == 10 and again.last_loss == result.last_loss
    for k, v in _weights(full).items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_ema_writes_the_warmed_up_average_of_the_weights(tmp_path, monkeypatch):
    # reference: ema_1 = w_1; ema_t = d_t ema_(t-1) + (1 - d_t) w_t, d_t = min(decay, 1 - (t - 1) ** -0.75)
    seen = []
    monkeypatch.setattr(_Tiny, "after_step", lambda self, step, total: seen.append(_weights(self)))
    averaged = _Tiny()
    fit(averaged, _Images(), _cfg(epochs=3, ema_decay=0.6), tmp_path / "ema", device=torch.device("cpu"), base_lr=0.05)
    expected = dict(seen[0])
    for t, w in enumerate(seen[1:], start=2):
        d = min(0.6, 1 - (t - 1) ** -0.75)
        expected = {k: d * expected[k] + (1 - d) * w[k] for k in w}
    assert len(seen) == 30
    for k, v in averaged.state_dict().items():
        assert torch.allclose(v, expected[k], atol=1e-6), k
        assert not torch.allclose(v, seen[-1][k]), k  # the average, not the last weights


class _Recording(_Tiny):
    """_Tiny that keeps every step's loss (accumulate 1: one forward per optimizer step)."""

    def forward(self, views, labels):
        loss, metrics = super().forward(views, labels)
        self.events.append(loss.item())
        return loss, metrics


def test_the_epoch_line_shows_the_epochs_mean_loss(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(loop, "interactive", lambda: False)
    method = _Recording()
    with caplog.at_level(logging.INFO, logger="finegrain"):
        fit(method, _Images(), _cfg(log_every=100), tmp_path, device=torch.device("cpu"), base_lr=0.01)
    losses = [e for e in method.events if e != "f"]
    assert len(losses) == 20  # 10 steps an epoch
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    for epoch, line in enumerate(lines):
        mean = sum(losses[10 * epoch:10 * epoch + 10]) / 10
        assert f"mean loss {mean:.4f}" in line, line


@pytest.mark.parametrize("check_every_step", [True, False], ids=["cpu", "deferred-as-on-cuda"])
def test_the_guard_sees_every_steps_loss_where_reading_it_is_free(tmp_path, monkeypatch, check_every_step):
    monkeypatch.setattr(loop, "_check_every_step", lambda device: check_every_step)
    seen = []
    original = loop.DivergenceGuard.check_step
    monkeypatch.setattr(loop.DivergenceGuard, "check_step",
                        lambda self, step, loss, accuracy=None: seen.append((step, loss)) or original(self, step, loss))
    method = _Recording()
    fit(method, _Images(), _cfg(log_every=8), tmp_path, device=torch.device("cpu"), base_lr=0.01)
    losses = [e for e in method.events if e != "f"]
    if check_every_step:
        assert seen == [(step, pytest.approx(loss)) for step, loss in enumerate(losses, start=1)]
    else:  # log steps only: the first, every 8th and the last
        assert [step for step, _ in seen] == [1, 8, 16, 20]


def test_a_resume_at_the_last_step_reports_the_final_loss(tmp_path):
    first = fit(_Tiny(), _Images(), _cfg(), tmp_path, device=torch.device("cpu"), base_lr=0.01)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == first.steps == 20
    again = fit(_Tiny(), _Images(), _cfg(resume=True), tmp_path, device=torch.device("cpu"), base_lr=0.01)
    assert again.steps == 20 and again.last_loss == first.last_loss  # not nan


def test_a_one_step_schedule_raises_no_timm_warning(caplog):
    model = nn.Linear(2, 1)
    with caplog.at_level(logging.WARNING):
        optimizer, scheduler = loop.build_optimizer(model, _cfg(optimizer="sgd"), 0.1, total=1, warmup=0)
    assert not [r for r in caplog.records if "no effect" in r.getMessage()]
    scheduler.step_update(0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # the one step runs at the base rate


def test_resume_without_a_checkpoint_says_it_starts_from_the_beginning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="finegrain"):
        result = fit(_Tiny(), _Images(), _cfg(resume=True, epochs=1), tmp_path, device=torch.device("cpu"), base_lr=0.01)
    assert result.steps == 10
    assert any("no checkpoint in" in r.getMessage() and "from the start" in r.getMessage() for r in caplog.records)


def test_a_run_resumed_mid_epoch_reports_the_whole_epochs_mean_loss(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(loop, "interactive", lambda: False)
    cfg = dict(checkpoint_every=3, log_every=100)

    def epoch_lines():
        return [r.getMessage().split(", lr")[0] for r in caplog.records if r.getMessage().startswith("epoch 2/2")]

    with caplog.at_level(logging.INFO, logger="finegrain"):
        fit(_Tiny(), _Images(), _cfg(**cfg), tmp_path / "full", device=torch.device("cpu"), base_lr=0.01)
        full = epoch_lines()
        caplog.clear()

        def crash_at_14(self, step, total):
            if step == 14:
                raise _Crash()

        monkeypatch.setattr(_Tiny, "after_step", crash_at_14)
        with pytest.raises(_Crash):
            fit(_Tiny(), _Images(), _cfg(**cfg), tmp_path / "cut", device=torch.device("cpu"), base_lr=0.01)
        monkeypatch.setattr(_Tiny, "after_step", lambda self, step, total: None)
        assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 12  # mid-epoch 2
        fit(_Tiny(), _Images(), _cfg(resume=True, **cfg), tmp_path / "cut", device=torch.device("cpu"), base_lr=0.01)
        resumed = epoch_lines()
    assert len(full) == 1 and resumed == full  # "epoch 2/2: step 20/20, mean loss X" over all 10 steps
