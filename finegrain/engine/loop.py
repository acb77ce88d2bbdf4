"""The training loop: any method, any view recipe, CPU or CUDA, one process or torchrun.

A *method* is an nn.Module whose `forward(views, labels) -> (loss, metrics)` computes the loss of
one batch (views: list of (B, 3, S, S) tensors; labels: (B,) int, -1 = unlabeled) and which may
define `after_step(step, total_steps)` (momentum updates) . Its state_dict holds everything it needs
to resume (momentum encoders and queues are submodules and buffers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from finegrain import dist
from finegrain.config import TrainConfig
from finegrain.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from finegrain.engine.device import resolve_amp
from finegrain.engine.sampler import EpochSampler
from finegrain.errors import FinegrainError

log = logging.getLogger("finegrain")


class TrainingDiverged(FinegrainError):
    """The loss became NaN or infinite."""


@dataclass
class FitResult:
    """What `fit` returns: the final step, the last logged loss, the last monitor metrics."""

    steps: int
    epochs_done: int
    last_loss: float
    monitor: dict


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
        monitor: called as monitor(method, epoch) at each epoch end; returns metrics to log.
        param_groups: optional optimizer parameter groups (layer-wise rates: a group's "lr_scale"
            multiplies the scheduled rate); default: every parameter of `method` that requires grad.
        sampler: an index sampler with `batches_per_epoch` and `set_epoch(epoch, start_batch)`
            that yields whole batches of cfg.batch_size for this rank (default: EpochSampler).
    """
    import timm.optim
    from timm.scheduler import CosineLRScheduler

    rank, world = dist.rank(), dist.world_size()
    amp_dtype = resolve_amp(cfg.amp, device)
    method.to(device)
    if cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    train_module = method
    if world > 1:
        if cfg.sync_bn and device.type == "cuda":
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        train_module = nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=getattr(method, "find_unused_parameters", False))

    if cfg.compile:
        train_module = torch.compile(train_module)

    if sampler is None:
        sampler = EpochSampler(len(dataset), cfg.batch_size, seed=cfg.seed, rank=rank, world=world)
    per_epoch = sampler.batches_per_epoch // cfg.accumulate
    if per_epoch == 0:
        raise FinegrainError(
            f"{len(dataset)} training images are too few for batches of {cfg.batch_size} x {world} process(es)"
            f" x {cfg.accumulate} accumulation; lower --batch-size")
    total = cfg.epochs * per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    warmup = min(int(round(cfg.warmup_epochs * per_epoch)), max(0, total - 1))

    optimizer = timm.optim.create_optimizer_v2(
        param_groups if param_groups is not None else method, opt=cfg.optimizer, lr=base_lr,
        weight_decay=cfg.weight_decay, momentum=0.9)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=base_lr * 1e-3, warmup_t=warmup,
                                  warmup_lr_init=base_lr * 1e-3, warmup_prefix=True, t_in_epochs=False)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    step, epoch, batch_in_epoch = 0, 0, 0
    ckpt = load_checkpoint(out_dir) if cfg.resume else None
    if ckpt is not None:
        method.load_state_dict(ckpt["method"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        set_rng_state(ckpt["rng"])
        if ckpt.get("total") != total:
            raise FinegrainError(f"the checkpoint was made for {ckpt.get('total')} steps but this run has {total}; resume with the same --epochs/--max-steps/--batch-size")
        if dist.is_main():
            log.info("resumed from %s at step %d (epoch %d, batch %d)", Path(out_dir) / "checkpoint.pt", step, epoch, batch_in_epoch)

    def checkpoint(epoch_: int, batch_: int) -> None:
        if dist.is_main():
            save_checkpoint(out_dir, {
                "method": method.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "epoch": epoch_, "batch_in_epoch": batch_, "total": total, "rng": rng_state(),
                "wandb_run_id": getattr(tracker, "run_id", None),
            })
        dist.barrier()

    last_loss, monitor_metrics = float("nan"), {}
    images_per_step = cfg.batch_size * cfg.accumulate * world

    def run_monitor(epoch_: int) -> dict:
        metrics = monitor(method, epoch_) if monitor is not None else {}
        if metrics and tracker is not None:
            tracker.log({f"monitor/{k}": v for k, v in metrics.items()} | {"epoch": epoch_}, step=step)
        if metrics and dist.is_main():
            log.info("epoch %d: %s", epoch_, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    if step == 0:
        run_monitor(0)  # the starting point, to compare each epoch with
    with _progress(dist.is_main()) as progress:
        task = progress.add_task("training", total=total, completed=step, stats="")
        while step < total and epoch < cfg.epochs:
            sampler.set_epoch(epoch, batch_in_epoch)
            dataset.set_epoch(epoch)
            loader = DataLoader(
                dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, num_workers=cfg.workers,
                pin_memory=device.type == "cuda", persistent_workers=False,
                generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch), worker_init_fn=_quiet_worker)
            train_module.train()
            micro, t_last, n_since = 0, time.perf_counter(), 0
            optimizer.zero_grad(set_to_none=True)
            for views, labels, _ in loader:
                views = [v.to(device, non_blocking=True) for v in views]
                if cfg.channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                labels = labels.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss, metrics = train_module(views, labels)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"the loss became {loss.item()} at step {step} (epoch {epoch}); training stopped. "
                        f"The last good checkpoint is kept in {out_dir}. Try a lower --lr, --amp off, or check the data.")
                scaler.scale(loss / cfg.accumulate).backward()
                micro += 1
                batch_in_epoch += 1
                if micro % cfg.accumulate:
                    continue
                scheduler.step_update(step)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if hasattr(method, "after_step"):
                    method.after_step(step, total)
                last_loss = loss.item()
                n_since += images_per_step
                lr = optimizer.param_groups[0]["lr"]
                if step % cfg.log_every == 0 or step == total or step == 1:
                    now = time.perf_counter()
                    ips = n_since / max(now - t_last, 1e-9)
                    t_last, n_since = now, 0
                    if tracker is not None:
                        tracker.log({"train/loss": last_loss, "train/lr": lr, "train/img_per_s": ips, "epoch": epoch,
                                     **{f"train/{k}": float(v) for k, v in metrics.items()}}, step=step)
                    progress.update(task, stats=f"loss {last_loss:.4f}  lr {lr:.2e}  {ips:.0f} img/s")
                progress.update(task, completed=step)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                    checkpoint(epoch, batch_in_epoch)
                if step >= total:
                    break
            epoch += 1
            batch_in_epoch = 0
            monitor_metrics = run_monitor(epoch)
            checkpoint(epoch, 0)
    return FitResult(steps=step, epochs_done=epoch, last_loss=last_loss, monitor=monitor_metrics)
