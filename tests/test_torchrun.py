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


@pytest.mark.slow
def test_torchrun_distributes_every_stage_of_a_pipeline_and_rank0_decides_the_cache(birds, tmp_path):
    import json

    import yaml

    spec = {"name": "t", "runs_dir": str(tmp_path / "runs"),
            "data": {"manifest": str(birds.root / "manifest.csv"), "split": {"val_fraction": 0.2, "seed": 0}},
            "defaults": {"backbone": "test_efficientnet", "weights": "none", "image_size": 32, "workers": 0,
                         "wandb": "disabled", "cache_dir": str(tmp_path / "cache"), "knn_monitor": False},
            "stages": {"pretrain": {"batch_size": 4, "epochs": 1, "proj_dim": 16},
                       "supcon": {"batch_size": 4, "classes_per_batch": 2, "epochs": 1, "proj_dim": 16},
                       "evaluate": {"embedding_map": False}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "finegrain", "run", str(tmp_path / "p.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    stages = json.loads((tmp_path / "runs" / "pipeline.json").read_text())["stages"]
    assert [s["status"] for s in stages] == ["ran", "ran", "ran"]
    pretrain = load_artifact(stages[0]["path"])
    # the split leaves 19 or 20 train photos: 2 ranks x 4 a batch -> 2 steps in the epoch (drop last)
    assert pretrain.info["metrics"]["steps"] == 2
    assert first.stdout.count("Compared with") == 1  # rank 0 speaks for the run
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    stages = json.loads((tmp_path / "runs" / "pipeline.json").read_text())["stages"]
    assert [s["status"] for s in stages] == ["cached", "cached", "cached"]
