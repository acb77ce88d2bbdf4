"""The training loop: any method, any view recipe, CPU or CUDA, one process or torchrun.

The method contract. A *method* is a `finegrain.methods.base.BackboneMethod` (an nn.Module) with:

* ``forward(views, labels) -> (loss, metrics)``: the loss of one batch (views: list of (B, 3, S, S)
  tensors; labels: (B,) int, -1 = unlabeled) and a dict of scalars logged on log steps;
* ``after_step(step, total_steps)``: called after every optimizer step (momentum updates, queues,
  head warm-up); the base class's does nothing;
* ``find_unused_parameters``: handed to DDP (True when some parameters are outside the graph on some steps);
* ``embed(images) -> (B, D)``: the features the monitor, evaluation and later stages use.

Its state_dict holds everything it needs to resume (momentum encoders and queues are submodules and buffers).

How `fit` reads: `_prepare` (device, SyncBatchNorm, DDP, compile), `build_optimizer` (timm optimizer
and cosine schedule), `_restore` (resume from checkpoint.pt), then `_run_epoch` per epoch, which
runs `_micro_step` (forward + backward) per batch and `_optimizer_step` every `accumulate` batches;
`_Logger` writes the progress bar, the tracker lines and the monitor's metrics; `_checkpoint` saves.
The run's fixed settings are in `_Run`, what changes from step to step in `LoopState`.

Gradient accumulation under DDP: the micro-steps that do not step the optimizer run inside
``no_sync()``, so gradients are all-reduced once per optimizer step, on its last micro-step.

Non-finite losses: on CPU each micro-step's loss is checked before its backward (a host read costs
nothing there), and the divergence guard sees every optimizer step's loss. On CUDA a read each
micro-step would stall the GPU, so the loop keeps the first non-finite loss and the last loss on the device and reads them (`_read_losses`) only on log steps,
at each epoch end (before the monitor), before every checkpoint and at the end: a divergence raises
TrainingDiverged there, before any checkpoint is written with the damaged weights. Under DDP the
flag is summed over ranks at those reads, so every rank stops at the same point. The guard then
sees the losses of log steps only.

The epoch line reports the epoch's mean loss: the steps' losses are summed on the device and read
once, at the epoch end. The checkpoint keeps the last step's loss and the epoch's sum so far, so a
run resumed at its last step still reports its final loss, and one resumed mid-epoch the whole
epoch's mean.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from finegrain import dist
from finegrain.config import TrainConfig
from finegrain.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from finegrain.engine.device import resolve_amp
from finegrain.engine.guard import DivergenceGuard
from finegrain.engine.sampler import EpochSampler
from finegrain.errors import FinegrainError
from finegrain.progress import interactive

log = logging.getLogger("finegrain")


class TrainingDiverged(FinegrainError):
    """The loss became NaN or infinite."""


@dataclass
class FitResult:
    """What `fit` returns: the final step, the last step's loss, the last monitor metrics, and the time
    the fit took (seconds) and how much of it the kNN monitor's readings took."""

    steps: int
    epochs_done: int
    last_loss: float
    monitor: dict
    seconds: float = 0.0
    monitor_seconds: float = 0.0
    monitor_readings: int = 0


@dataclass
class _Run:
    """What stays fixed during one `fit` call."""

    cfg: TrainConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    out_dir: Path
    tracker: Any
    world: int
    check_every_step: bool  # read each loss on the host before its backward (CPU); else deferred reads


@dataclass
class LoopState:
    """What the loop carries from step to step; the checkpoint saves it."""

    method: nn.Module  # whose state_dict is saved (after SyncBatchNorm conversion)
    train_module: nn.Module  # what is called: the method, DDP(method), or either compiled
    ddp: nn.parallel.DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm CosineLRScheduler
    scaler: torch.amp.GradScaler
    total: int  # optimizer steps of the whole run
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches done in this epoch
    last_loss: torch.Tensor | None = None  # the last optimizer step's loss, detached, on the device
    first_bad: torch.Tensor | None = None  # deferred reads: the first non-finite loss (finite: none yet)
    checked_step: int = 0  # deferred reads: the step of the last read that found every loss finite
    ema: nn.Module | None = None  # timm ModelEmaV3 of `method` (cfg.ema_decay > 0); its `module` is the average
    epoch_loss_sum: torch.Tensor | None = None  # this epoch's optimizer-step losses summed on the device
    epoch_loss_steps: int = 0  # how many steps epoch_loss_sum holds


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False,
    )


def _quiet_worker(worker_id: int) -> None:
    """DataLoader workers run OpenCV (albumentations) single-threaded: torch already limits them to one
    thread, but OpenCV's own pool would otherwise compete with the train step's threads for the cores."""
    import cv2

    cv2.setNumThreads(1)


def _check_every_step(device: torch.device) -> bool:
    """Read every loss on the host before its backward: on CPU, where the read costs nothing."""
    return device.type == "cpu"


# ---------------------------------------------------------------------------------------------
# set-up: modules, schedule, optimizer, resume
# ---------------------------------------------------------------------------------------------


def _prepare(method: nn.Module, cfg: TrainConfig, device: torch.device, world: int):
    """Move `method` to `device` (channels_last), convert BatchNorm and wrap in DDP under torchrun, compile.

    Returns (method, train_module, ddp): the module to save, the one to call, the DDP wrapper or None.
    """
    method.to(device)
    if cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    train_module, ddp = method, None
    if world > 1:
        if cfg.sync_bn and device.type == "cuda":
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        ddp = train_module = nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=method.find_unused_parameters)
    if cfg.compile:
        train_module = torch.compile(train_module)
    return method, train_module, ddp


def _schedule_length(cfg: TrainConfig, n_images: int, sampler, world: int) -> tuple[int, int]:
    """(total optimizer steps, warm-up steps) for this dataset, sampler and accumulation."""
    per_epoch = sampler.batches_per_epoch // cfg.accumulate
    if per_epoch == 0:
        raise FinegrainError(
            f"{n_images} training images are too few for batches of {cfg.batch_size} x {world} process(es)"
            f" x {cfg.accumulate} accumulation; lower --batch-size")
    total = cfg.epochs * per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    warmup = min(int(round(cfg.warmup_epochs * per_epoch)), max(0, total - 1))
    return total, warmup


def build_optimizer(params, cfg: TrainConfig, base_lr: float, total: int, warmup: int):
    """timm's optimizer `cfg.optimizer` on `params` (a module or parameter groups) and a per-step cosine
    schedule from base_lr to base_lr / 1000 after `warmup` linear steps from base_lr / 1000.

    Returns (optimizer, scheduler); call scheduler.step_update(step) before each optimizer step.
    """
    import timm.optim
    from timm.scheduler import CosineLRScheduler

    optimizer = timm.optim.create_optimizer_v2(
        params, opt=cfg.optimizer, lr=base_lr, weight_decay=cfg.weight_decay, momentum=0.9)
    # A cosine of length 1 and one of length 2 give the single step after warm-up the same rate (base_lr);
    # length 2 keeps timm from warning that the schedule "will have no effect" on one-step runs.
    scheduler = CosineLRScheduler(optimizer, t_initial=max(2, total - warmup), lr_min=base_lr * 1e-3, warmup_t=warmup,
                                  warmup_lr_init=base_lr * 1e-3, warmup_prefix=True, t_in_epochs=False)
    return optimizer, scheduler


def _make_ema(method: nn.Module, cfg: TrainConfig) -> nn.Module | None:
    """timm's weight EMA of `method` (on its device), or None when cfg.ema_decay is 0.

    The decay warms up (1 - (1 + step) ** -0.75, capped at cfg.ema_decay), so a short fine-tuning run
    is not averaged with its starting weights.
    """
    if not cfg.ema_decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(method, decay=cfg.ema_decay, use_warmup=True, warmup_power=0.75)


def _method_device(st: LoopState) -> torch.device:
    """The device the method's parameters are on."""
    return next(st.method.parameters()).device


def _restore(st: LoopState, out_dir) -> None:
    """Load out_dir's checkpoint (if any) into `st`: weights, optimizer, scaler, position, RNGs."""
    ckpt = load_checkpoint(out_dir)
    if ckpt is None:  # said, not silent: a mistyped --out would otherwise quietly train from scratch
        if dist.is_main():
            log.warning("--resume: no checkpoint in %s; training from the start", out_dir)
        return
    st.method.load_state_dict(ckpt["method"])
    if st.ema is not None:
        if "ema" not in ckpt:
            raise FinegrainError(f"the checkpoint in {out_dir} was made without --ema-decay; resume with the same options")
        st.ema.load_state_dict(ckpt["ema"])
    st.optimizer.load_state_dict(ckpt["optimizer"])
    st.scaler.load_state_dict(ckpt["scaler"])
    st.step, st.epoch, st.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
    st.checked_step = st.step
    device = _method_device(st)
    if "last_loss" in ckpt:  # a resume at the last step still knows the final loss
        st.last_loss = torch.tensor(float(ckpt["last_loss"]), device=device)
    if ckpt.get("epoch_loss_steps"):  # a resume mid-epoch still reports the whole epoch's mean
        st.epoch_loss_sum = torch.tensor(float(ckpt["epoch_loss_sum"]), device=device)
        st.epoch_loss_steps = int(ckpt["epoch_loss_steps"])
    set_rng_state(ckpt["rng"])
    if ckpt.get("total") != st.total:
        raise FinegrainError(f"the checkpoint was made for {ckpt.get('total')} steps but this run has {st.total}; resume with the same --epochs/--max-steps/--batch-size")
    if dist.is_main():
        log.info("resumed from %s at step %d (epoch %d, batch %d)", Path(out_dir) / "checkpoint.pt", st.step, st.epoch, st.batch_in_epoch)


# ---------------------------------------------------------------------------------------------
# losses: non-finite checks, host reads
# ---------------------------------------------------------------------------------------------


def _diverged(run: _Run, what: str) -> TrainingDiverged:
    return TrainingDiverged(
        f"the loss became {what}; training stopped. "
        f"The last good checkpoint is kept in {run.out_dir}. Try a lower --lr, --amp off, or check the data.")


def _note_loss(run: _Run, st: LoopState, loss: torch.Tensor) -> None:
    """Before the backward: stop at a non-finite loss (CPU), or remember the first one on the device (CUDA)."""
    if run.check_every_step:
        if not torch.isfinite(loss):
            raise _diverged(run, f"{loss.item()} at step {st.step} (epoch {st.epoch})")
        return
    value = loss.detach().float()
    st.first_bad = value if st.first_bad is None else torch.where(torch.isfinite(st.first_bad), value, st.first_bad)


def _read_losses(run: _Run, st: LoopState) -> float:
    """The last step's loss as a float (nan before the first step); one host read.

    With deferred checks, raises TrainingDiverged when a loss since the last read was not finite
    (on any rank: a collective under DDP, so every rank must call it at the same step).
    """
    last = st.last_loss if st.last_loss is not None else torch.tensor(float("nan"), device=run.device)
    if run.check_every_step or st.first_bad is None:
        return last.item()
    bad_here = (~torch.isfinite(st.first_bad)).float()
    bad_anywhere = bad_here.clone()
    if run.world > 1:
        torch.distributed.all_reduce(bad_anywhere)  # sum over ranks
    bad_here, bad_anywhere, value, last_value = torch.stack([bad_here, bad_anywhere, st.first_bad, last.float()]).tolist()
    if bad_anywhere:
        what = value if bad_here else "non-finite on another process"
        raise _diverged(run, f"{what} between step {st.checked_step} and step {st.step} (epoch {st.epoch})")
    st.checked_step = st.step
    return last_value


# ---------------------------------------------------------------------------------------------
# one epoch
# ---------------------------------------------------------------------------------------------


def _epoch_loader(dataset, sampler, cfg: TrainConfig, device: torch.device, epoch: int) -> DataLoader:
    return DataLoader(
        dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True, num_workers=cfg.workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
        generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch), worker_init_fn=_quiet_worker)


def _micro_step(run: _Run, st: LoopState, views, labels, *, sync: bool):
    """Forward and backward of one micro-batch; under DDP, gradients are all-reduced only when `sync`."""
    cfg, device = run.cfg, run.device
    views = [v.to(device, non_blocking=True) for v in views]
    if cfg.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    labels = labels.to(device, non_blocking=True)
    no_sync = st.ddp.no_sync() if st.ddp is not None and not sync else contextlib.nullcontext()
    with no_sync:
        with torch.autocast(device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
            loss, metrics = st.train_module(views, labels)
        _note_loss(run, st, loss)
        st.scaler.scale(loss / cfg.accumulate).backward()
    return loss, metrics


def _optimizer_step(st: LoopState, loss: torch.Tensor) -> None:
    """Schedule, step (through the AMP scaler), clear the gradients, then the method's after_step."""
    st.scheduler.step_update(st.step)
    st.scaler.step(st.optimizer)
    st.scaler.update()
    st.optimizer.zero_grad(set_to_none=True)
    st.step += 1
    st.method.after_step(st.step, st.total)
    if st.ema is not None:
        st.ema.update(st.method, step=st.step)
    st.last_loss = loss.detach()
    value = st.last_loss.float()
    st.epoch_loss_sum = value if st.epoch_loss_sum is None else st.epoch_loss_sum + value
    st.epoch_loss_steps += 1


def _run_epoch(run: _Run, st: LoopState, dataset, sampler, logger: _Logger) -> None:
    """Train through the rest of epoch `st.epoch` (or until the last step), checkpointing as asked."""
    cfg = run.cfg
    sampler.set_epoch(st.epoch, st.batch_in_epoch)
    dataset.set_epoch(st.epoch)
    loader = _epoch_loader(dataset, sampler, cfg, run.device, st.epoch)
    st.train_module.train()
    logger.start_epoch()
    if st.batch_in_epoch == 0:  # else resumed mid-epoch: the restored sum goes on
        st.epoch_loss_sum, st.epoch_loss_steps = None, 0
    micro = 0
    st.optimizer.zero_grad(set_to_none=True)
    for views, labels, _ in loader:
        last_micro = (micro + 1) % cfg.accumulate == 0
        loss, metrics = _micro_step(run, st, views, labels, sync=last_micro)
        micro += 1
        st.batch_in_epoch += 1
        if not last_micro:
            continue
        _optimizer_step(st, loss)
        logger.after_step(run, st, metrics)
        if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0 and st.step < st.total:
            _checkpoint(run, st, logger.guard)
        if st.step >= st.total:
            break
    st.epoch += 1
    st.batch_in_epoch = 0


def _checkpoint(run: _Run, st: LoopState, guard: DivergenceGuard | None = None) -> None:
    """Save the training state (rank 0) after checking the losses: damaged weights are never saved.

    While the divergence guard sees a signal over its threshold, no checkpoint is written, so the
    last one on disk predates the trouble.
    """
    last_loss = _read_losses(run, st)
    if guard is not None and guard.suspicious:
        if dist.is_main():
            log.warning("step %d: checkpoint held back while the loss looks diverged or stuck", st.step)
        return
    if dist.is_main():
        save_checkpoint(run.out_dir, {
            "method": st.method.state_dict(), "optimizer": st.optimizer.state_dict(), "scaler": st.scaler.state_dict(),
            "step": st.step, "epoch": st.epoch, "batch_in_epoch": st.batch_in_epoch, "total": st.total,
            "rng": rng_state(), "wandb_run_id": getattr(run.tracker, "run_id", None), "last_loss": last_loss,
            "epoch_loss_sum": st.epoch_loss_sum.item() if st.epoch_loss_steps else 0.0,
            "epoch_loss_steps": st.epoch_loss_steps,
            **({"ema": st.ema.state_dict()} if st.ema is not None else {}),
        })
    dist.barrier()


# ---------------------------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------------------------


class _Logger:
    """Progress bar and tracker lines every cfg.log_every steps (and on the first and last), monitor metrics."""

    def __init__(self, cfg: TrainConfig, tracker, monitor, images_per_step: int, guard: DivergenceGuard | None):
        self.cfg, self.tracker, self.monitor_fn, self.images_per_step = cfg, tracker, monitor, images_per_step
        self.guard = guard
        self.progress, self.task = None, None
        self.t_last, self.n_since = time.perf_counter(), 0
        self.t_epoch, self.n_epoch = self.t_last, 0
        self.t_fit = self.t_last  # the monitor's share is of the time since here
        self.monitor_seconds, self.monitor_readings, self.monitor_skipped, self._last_reading = 0.0, 0, 0, 0.0

    def attach(self, progress, task) -> None:
        self.progress, self.task = progress, task

    def start_epoch(self) -> None:
        self.t_last, self.n_since = time.perf_counter(), 0
        self.t_epoch, self.n_epoch = self.t_last, 0

    def end_epoch(self, st: LoopState) -> float | None:
        """The mean loss of the epoch's steps (None without steps; one host read), also logged to the
        tracker; without a live bar (output not a terminal) one log line for the epoch just finished."""
        mean = (st.epoch_loss_sum / st.epoch_loss_steps).item() if st.epoch_loss_steps else None
        if mean is not None and self.tracker is not None:
            self.tracker.log({"train/epoch_loss": mean, "epoch": st.epoch}, step=st.step)
        if interactive() or not dist.is_main():
            return mean
        seconds = time.perf_counter() - self.t_epoch
        log.info("epoch %d/%d: step %d/%d%s, lr %.2e, %.1f img/s, %.0f s", st.epoch, self.cfg.epochs, st.step, st.total,
                 f", mean loss {mean:.4f}" if mean is not None else "",
                 st.optimizer.param_groups[0]["lr"], self.n_epoch / max(seconds, 1e-9), seconds)
        return mean

    def after_step(self, run: _Run, st: LoopState, metrics: dict) -> None:
        """After each optimizer step: the guard sees the loss (every step on CPU, where the host read is
        free; log steps only on CUDA); log steps also update the bar and the tracker."""
        self.n_since += self.images_per_step
        self.n_epoch += self.images_per_step
        lr = st.optimizer.param_groups[0]["lr"]
        log_step = st.step % self.cfg.log_every == 0 or st.step == st.total or st.step == 1
        if not (log_step or (self.guard is not None and run.check_every_step)):
            self.progress.update(self.task, completed=st.step)
            return
        last_loss = _read_losses(run, st)
        if log_step:
            now = time.perf_counter()
            ips = self.n_since / max(now - self.t_last, 1e-9)
            self.t_last, self.n_since = now, 0
            if self.tracker is not None:
                self.tracker.log({"train/loss": last_loss, "train/lr": lr, "train/img_per_s": ips, "epoch": st.epoch,
                                  **{f"train/{k}": float(v) for k, v in metrics.items()}}, step=st.step)
            self.progress.update(self.task, stats=f"loss {last_loss:.4f}  lr {lr:.2e}  {ips:.0f} img/s")
        if self.guard is not None:  # after the log line, so the step that stops the run is in metrics.jsonl
            accuracy = float(metrics["accuracy"]) if "accuracy" in metrics else None
            _stop_if(run, self.guard.check_step(st.step, last_loss, accuracy))
        self.progress.update(self.task, completed=st.step)

    def monitor_due(self, st: LoopState) -> bool:
        """Whether to take a reading now: always the first and the last one; otherwise only while the
        monitor, with one more reading as long as its last, stays within cfg.knn_monitor_share of the time."""
        if self.monitor_readings == 0 or st.step >= st.total or st.epoch >= self.cfg.epochs:
            return True
        elapsed = time.perf_counter() - self.t_fit
        return self.monitor_seconds + self._last_reading <= self.cfg.knn_monitor_share * (elapsed + self._last_reading)

    def monitor(self, run: _Run, st: LoopState, epoch: int) -> dict:
        """Run the monitor (if any, and if due) on the method; log its metrics; let the guard judge its kNN top-1."""
        metrics = {}
        if self.monitor_fn is not None and self.monitor_due(st):
            started = time.perf_counter()
            metrics = self.monitor_fn(st.method, epoch)
            self._last_reading = time.perf_counter() - started
            self.monitor_seconds += self._last_reading
            self.monitor_readings += 1
        elif self.monitor_fn is not None:
            self.monitor_skipped += 1
        if metrics and self.tracker is not None:
            self.tracker.log({f"monitor/{k}": v for k, v in metrics.items()} | {"epoch": epoch}, step=st.step)
        if metrics and dist.is_main():
            log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if self.guard is not None:  # every rank calls it (the monitor runs on rank 0 only)
            top1 = next((v for k, v in metrics.items() if k.startswith("knn_top1")), None)
            _stop_if(run, self.guard.check_monitor(epoch, st.step, top1, metrics.get("knn_chance")))
        return metrics


def _stop_if(run: _Run, reason: str | None) -> None:
    """Raise TrainingDiverged for the guard's reason; under DDP every rank stops when any found one.

    A collective: every rank calls it at the same points (log steps, epoch ends).
    """
    stop = bool(reason)
    if run.world > 1:
        flag = torch.tensor([float(stop)], device=run.device)
        torch.distributed.all_reduce(flag)
        stop = bool(flag.item())
    if stop:
        reason = reason or "the divergence guard stopped another process"
        raise TrainingDiverged(f"training stopped: {reason}. The last good checkpoint is kept in {run.out_dir}; "
                               "a lower --lr (or --backbone-lr-scale) usually avoids it.")


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------


def fit(
    method: nn.Module,
    dataset,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    device: torch.device,
    base_lr: float,
    tracker=None,
    monitor: Callable[[nn.Module, int], dict] | None = None,
    param_groups=None,
    sampler=None,
) -> FitResult:
    """Train `method` on `dataset` as `cfg` says; checkpoint into `out_dir`; resume when asked.

    Args:
        method: the method module (see module docstring), on CPU; moved to `device` here.
        dataset: a ManifestDataset (seeded: `set_epoch` selects augmentations per epoch).
        cfg: batch_size (per process), epochs, max_steps, optimizer, weight_decay, warmup_epochs,
            accumulate, amp, channels_last, compile, checkpoint_every, resume, seed, workers.
        base_lr: the learning rate to use (already scaled for the batch size).
        tracker: a finegrain.tracking.Tracker (rank 0) or None.
        monitor: called as monitor(method, epoch) at the start and at epoch ends (paced to take at most
            cfg.knn_monitor_share of the time; the first and last calls always happen); returns metrics to log.
        param_groups: optional optimizer parameter groups (layer-wise rates: a group's "lr_scale"
            multiplies the scheduled rate); default: every parameter of `method` that requires grad.
        sampler: an index sampler with `batch_size`, `batches_per_epoch` and `set_epoch(epoch, start_batch)`
            that yields whole batches of its batch_size for this rank (default: EpochSampler).
    """
    rank, world = dist.rank(), dist.world_size()
    run = _Run(cfg, device, resolve_amp(cfg.amp, device), out_dir, tracker, world, _check_every_step(device))
    method, train_module, ddp = _prepare(method, cfg, device, world)
    if sampler is None:
        sampler = EpochSampler(len(dataset), cfg.batch_size, seed=cfg.seed, rank=rank, world=world)
    total, warmup = _schedule_length(cfg, len(dataset), sampler, world)
    optimizer, scheduler = build_optimizer(param_groups if param_groups is not None else method, cfg, base_lr, total, warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=run.amp_dtype == torch.float16)
    st = LoopState(method, train_module, ddp, optimizer, scheduler, scaler, total, ema=_make_ema(method, cfg))
    if cfg.resume:
        _restore(st, out_dir)

    guard = DivergenceGuard(accuracy_chance=method.accuracy_chance) if cfg.divergence_guard else None
    logger = _Logger(cfg, tracker, monitor, sampler.batch_size * cfg.accumulate * world, guard)
    monitor_metrics = {}
    if st.step == 0:
        logger.monitor(run, st, 0)  # the starting point, to compare each epoch with
    with _progress(dist.is_main() and interactive()) as progress:
        logger.attach(progress, progress.add_task("training", total=total, completed=st.step, stats=""))
        while st.step < total and st.epoch < cfg.epochs:
            _run_epoch(run, st, dataset, sampler, logger)
            _read_losses(run, st)  # no monitor on damaged weights
            logger.end_epoch(st)
            monitor_metrics = logger.monitor(run, st, st.epoch) or monitor_metrics
            _checkpoint(run, st, guard)
    if st.ema is not None:  # the average is the result; the checkpoint keeps both for a resume
        st.method.load_state_dict(st.ema.module.state_dict())
    seconds = time.perf_counter() - logger.t_fit
    if logger.monitor_readings and dist.is_main():
        log.info("kNN monitor: %d reading(s) took %.0f s of the run's %.0f s (%.0f%%)%s", logger.monitor_readings,
                 logger.monitor_seconds, seconds, 100 * logger.monitor_seconds / max(seconds, 1e-9),
                 f"; {logger.monitor_skipped} epoch end(s) skipped to stay within --knn-monitor-share "
                 f"{run.cfg.knn_monitor_share:g}" if logger.monitor_skipped else "")
    return FitResult(steps=st.step, epochs_done=st.epoch, last_loss=_read_losses(run, st), monitor=monitor_metrics,
                     seconds=seconds, monitor_seconds=logger.monitor_seconds, monitor_readings=logger.monitor_readings)
