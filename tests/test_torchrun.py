"""`torchrun --nproc_per_node 2 -m finegrain pretrain` on CPU (gloo): the real launcher, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finegrain.artifacts import load_artifact


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_two_process_pretrain(birds, tmp_path, method):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "finegrain", "pretrain",
           "--manifest", str(birds.root / "manifest.csv"), "-o", str(out), "--method", method,
           "--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32", "--batch-size", "4",
           "--epochs", "2", "--workers", "0", "--wandb", "disabled", "--cache-dir", str(tmp_path / "cache"),
           "--proj-dim", "16", "--log-every", "1"] + (["--queue-size", "32"] if method == "moco" else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    art = load_artifact(out)
    # 24 train images, 2 ranks x 4 per batch: 3 steps per epoch, 2 epochs. Only rank 0 wrote.
    assert art.info["metrics"]["steps"] == 6
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert sum('"train/loss"' in x for x in lines) == 6


@pytest.mark.slow
def test_two_process_supcon_with_pseudo_labels(birds, tmp_path):
    """Mixed batches under torchrun: each rank gets whole labelled + unlabelled batches; supcon gathers across ranks."""
    from finegrain.data.split import keep_label_fraction

    keep_label_fraction(birds, 0.5).save(birds.root / "few.csv")  # 12 labelled, 12 unlabelled train photos
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "finegrain", "supcon",
           "--manifest", str(birds.root / "few.csv"), "--out", str(out), "--unlabeled", "pseudo",
           "--pseudo-threshold", "0.3", "--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32",
           "--batch-size", "4", "--classes-per-batch", "2", "--unlabeled-batch-size", "3", "--epochs", "2",
           "--workers", "0", "--wandb", "disabled", "--cache-dir", str(tmp_path / "cache"), "--proj-dim", "16",
           "--log-every", "1", "--no-knn-monitor"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    art = load_artifact(out)
    # an epoch is one pass over the larger pool: max(12 // (4 x 2), 12 // (3 x 2)) = 2 steps; 2 epochs
    assert art.info["metrics"]["steps"] == 4 and art.info["unlabeled"] == "pseudo"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert sum('"train/pseudo_labelled"' in x for x in lines) == 4
