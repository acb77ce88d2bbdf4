"""A full disk, a read-only folder or a broken W&B never cost finished work: the previous checkpoint
stays valid, the error says what happened, and tracking failures only warn (once)."""

from __future__ import annotations

import errno
import io
import json
import logging
import math
import os

import pytest
import torch
from typer.testing import CliRunner

from finegrain import artifacts
from finegrain.artifacts import load_artifact
from finegrain.cli import app
from finegrain.config import PretrainConfig
from finegrain.stages import skeleton
from finegrain.stages.pretrain import run_pretrain

# 24 train images, batches of 8: 3 steps an epoch, 6 in all; checkpoints after steps 2, 3, 4 and 6.
TRAIN = ["--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32", "--batch-size", "8",
         "--epochs", "2", "--workers", "0", "--wandb", "disabled", "--no-knn-monitor", "--checkpoint-every", "2"]


def _args(birds, tmp_path):
    return ["pretrain", "--manifest", str(birds.root / "manifest.csv"), "-o", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), *TRAIN]


def _no_traceback(r):
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_checkpoint_write_failure_keeps_the_previous_checkpoint(birds, tmp_path, monkeypatch, code):
    real_save = torch.save
    calls = []

    def failing_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) < 2:
            return real_save(obj, path, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(path, "wb") as f:  # part of the file lands before the disk gives out
            f.write(buffer.getvalue()[:1000])
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(torch, "save", failing_save)
    r = CliRunner().invoke(app, _args(birds, tmp_path))
    _no_traceback(r)
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert os.strerror(code) in text and "previous checkpoint is unchanged" in text, r.output
    out = tmp_path / "out"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not list(out.glob(".*.tmp")), "the partial file is removed"

    monkeypatch.undo()  # space freed: the run resumes from the good checkpoint and finishes
    r = CliRunner().invoke(app, [*_args(birds, tmp_path), "--resume"])
    assert r.exit_code == 0, r.output
    assert load_artifact(out).info["metrics"]["steps"] == 6


def test_disk_full_while_writing_the_artifact(birds, tmp_path, monkeypatch):
    def full_disk(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(artifacts, "save_file", full_disk)
    r = CliRunner().invoke(app, _args(birds, tmp_path))
    _no_traceback(r)
    assert r.exit_code == 1 and "No space left on device" in " ".join(r.output.split()), r.output
    out = tmp_path / "out"
    assert not (out / "artifact.json").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6  # all the training is kept
    monkeypatch.undo()
    r = CliRunner().invoke(app, [*_args(birds, tmp_path), "--resume"])
    assert r.exit_code == 0, r.output
    info = load_artifact(out).info
    assert info["stage"] == "pretrain"
    # resumed at its last step: the final loss is the one the checkpoint kept, not nan (a "diverged" run)
    assert math.isfinite(info["metrics"]["final_loss"]) and "final_loss nan" not in r.output


def test_read_only_output_folder_is_refused_before_training(birds, tmp_path, monkeypatch):
    # Tests run as root here, where chmod cannot make a folder read-only: the file system's answer is faked.
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(skeleton.tempfile, "TemporaryFile", read_only)
    r = CliRunner().invoke(app, _args(birds, tmp_path))
    _no_traceback(r)
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "cannot write into" in text and "Read-only file system" in text, r.output
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


class _BrokenRun:
    """A W&B run whose every call fails, as when its folder or service goes away mid-run."""

    id, offline = "broken", True

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise RuntimeError(f"wandb {name} failed")

        return fail


@pytest.mark.parametrize("failure", ["init", "every call"])
def test_wandb_failures_warn_once_and_training_goes_on(birds, tmp_path, monkeypatch, failure):
    import wandb

    def init(*args, **kwargs):
        if failure == "init":
            raise RuntimeError("no W&B today")
        return _BrokenRun()

    monkeypatch.setattr(wandb, "init", init)
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("finegrain").addHandler(handler)
    try:
        art = run_pretrain(PretrainConfig(
            manifest=str(birds.root / "manifest.csv"), out=str(tmp_path / "out"), backbone="test_efficientnet",
            weights="none", image_size=32, batch_size=8, epochs=2, workers=0, wandb="offline", log_every=1,
            cache_dir=str(tmp_path / "cache"), knn_monitor=False))
    finally:
        logging.getLogger("finegrain").removeHandler(handler)
    wandb_warnings = [w for w in warnings if "W&B" in w]
    assert len(wandb_warnings) == 1, wandb_warnings
    lines = [json.loads(x) for x in (art.path / "metrics.jsonl").read_text().splitlines()]
    assert sorted({x["step"] for x in lines if "train/loss" in x}) == list(range(1, 7)), "every step still logged locally"
