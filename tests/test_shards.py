"""Shard folders (`finegrain manifest shard`): the same rows and photos, bad input named, exact resume, torchrun."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.data.dataset import ManifestDataset
from finegrain.data.images import resize_shorter
from finegrain.data.manifest import Manifest
from finegrain.data.shards import ShardError, write_shards

KILLER = Path(__file__).parent / "reliability" / "killed_run.py"
TRAIN = ["--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32", "--batch-size", "8",
         "--epochs", "2", "--workers", "2", "--wandb", "disabled", "--no-knn-monitor", "--checkpoint-every", "2",
         "--classes-per-batch", "4", "--proj-dim", "32"]


def test_a_shard_folder_reads_back_the_rows_and_photos_of_its_manifest(birds, tmp_path):
    info = write_shards(birds, tmp_path / "shards", max_side=32, shard_bytes="20KB", workers=2)
    assert info["records"] == len(birds) and info["shards"] > 1 and info["bad_records"] == 0
    sharded = Manifest.load(tmp_path / "shards")
    assert sharded.shards is not None
    cols = ["path", "label", "split"]
    assert sharded.table[cols].equals(birds.table[cols])
    assert sharded.content_hash != birds.content_hash  # the photos are other bytes: pipeline caches must not mix
    assert sharded.content_hash == Manifest.load(tmp_path / "shards").content_hash
    for i in (0, len(birds) // 2, len(birds) - 1):
        got, source = sharded.decode(i), birds.decode(i)
        assert got.original_size == source.original_size  # boxes stay in the original photo's frame
        assert min(got.pixels.shape[:2]) == 32
        diff = np.abs(got.pixels.astype(int) - resize_shorter(source.pixels, 32).astype(int)).mean()
        assert diff < 6, diff  # JPEG at quality 95 of the same resized pixels
    kept = write_shards(birds, tmp_path / "as_is", max_side=512)  # 64 px photos: their own bytes, nothing lost
    assert kept["bad_records"] == 0
    assert (Manifest.load(tmp_path / "as_is").decode(1).pixels == birds.decode(1).pixels).all()
    test_rows = sharded.rows("test")
    assert test_rows.shards == sharded.shards and test_rows.decode(0).pixels.shape == sharded.decode(
        int(np.flatnonzero(sharded.table["split"] == "test")[0])).pixels.shape


def test_an_incomplete_or_older_shard_folder_is_refused_naming_what_is_wrong(birds, tmp_path):
    folder = tmp_path / "shards"
    write_shards(birds, folder, max_side=32, shard_bytes="20KB")
    args = ["evaluate", "--manifest", str(folder), "-o", str(tmp_path / "e"), "--backbone", "test_efficientnet",
            "--weights", "none", "--wandb", "disabled"]
    chunk = sorted(folder.glob("chunk-*.bin"))[1]
    chunk.rename(tmp_path / "away.bin")
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and chunk.name in r.output and "incomplete" in r.output
    assert "Traceback" not in r.output
    (tmp_path / "away.bin").rename(chunk)
    info = json.loads((folder / "finegrain_shards.json").read_text())
    (folder / "finegrain_shards.json").write_text(json.dumps({**info, "format": 0}))
    with pytest.raises(ShardError, match="format 0"):
        Manifest.load(folder)
    with pytest.raises(ShardError, match="not empty"):
        write_shards(birds, folder)


def test_an_unreadable_photo_becomes_a_record_skipped_with_a_warning_naming_it(birds, tmp_path, caplog):
    bad = birds.table["path"].iat[3]
    (birds.root / bad).write_bytes(b"\xff\xd8 not a jpeg")
    with caplog.at_level(logging.WARNING, logger="finegrain"):
        info = write_shards(birds, tmp_path / "shards", max_side=32)
    assert info["bad_records"] == 1 and bad in caplog.text
    sharded = Manifest.load(tmp_path / "shards")
    from finegrain.data.views import build_view, make_recipe

    ds = ManifestDataset(sharded, build_view(make_recipe("eval", image_size=32)), on_bad_image="skip")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="finegrain"):
        _, label, served = ds[3]
    assert served == 4 and "shard record 3" in caplog.text and bad in caplog.text


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_on_shards_gives_the_uninterrupted_weights(birds, tmp_path):
    folder = tmp_path / "shards"
    write_shards(birds, folder, max_side=48)
    # --no-cache-images: each DataLoader worker reads the shard records itself (litdata random access)
    base = ["supcon", "--manifest", str(folder), "--no-cache-images", *TRAIN]
    r = CliRunner().invoke(app, base + ["-o", str(tmp_path / "whole")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, str(KILLER), "step:4", *base, "-o", str(out)], capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    r = CliRunner().invoke(app, base + ["-o", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all((whole[k] == resumed[k]).all() for k in whole)


@pytest.mark.slow
def test_two_process_torchrun_with_two_workers_each_trains_on_shards(birds, tmp_path):
    folder = tmp_path / "shards"
    write_shards(birds, folder, max_side=48)
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "finegrain", "pretrain", "--manifest",
           str(folder), "-o", str(out), "--method", "simclr", "--backbone", "test_efficientnet", "--weights", "none",
           "--image-size", "32", "--batch-size", "4", "--epochs", "2", "--workers", "2", "--wandb", "disabled",
           "--cache-dir", str(tmp_path / "cache"), "--proj-dim", "16", "--log-every", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # 24 train photos, 2 ranks x 4 a batch: 3 steps an epoch, 2 epochs (as on the JPEG folder)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert sum('"train/loss"' in x for x in lines) == 6


def test_report_photos_of_a_shard_set_come_from_its_records(birds, tmp_path):
    from finegrain.config import EvaluateConfig
    from finegrain.stages.evaluate import run_evaluate

    write_shards(birds, tmp_path / "shards", max_side=48)
    cfg = EvaluateConfig(manifest=str(tmp_path / "shards"), out=str(tmp_path / "e"), backbone="test_efficientnet",
                         weights="none", image_size=32, workers=0, wandb="disabled", cache_dir=str(tmp_path / "c"),
                         embedding_map=False, report_examples=1)
    page = (run_evaluate(cfg).path / "report" / "index.html").read_text()
    assert page.count("data:image/jpeg;base64,") >= len(birds.class_names)  # one correct photo a species at least
    assert "unreadable" not in page


def test_a_shard_folder_at_a_url_is_fetched_and_streamed_through_litdata(birds, tmp_path, monkeypatch):
    """`local:/path` takes litdata's download path (the one s3:// and gs:// take) without a network."""
    from finegrain.data import shards

    monkeypatch.setattr(shards, "META_CACHE", tmp_path / "meta_cache")
    monkeypatch.delenv("LITDATA_CACHE_DIR", raising=False)
    write_shards(birds, tmp_path / "shards", max_side=32, shard_bytes="20KB")
    url = f"local:{tmp_path / 'shards'}"
    remote, local = Manifest.load(url), Manifest.load(tmp_path / "shards")
    assert remote.shards == url and remote.table.equals(local.table)
    assert remote.content_hash == Manifest.load(url).content_hash
    for i in (0, len(birds) - 1):
        assert (remote.decode(i).pixels == local.decode(i).pixels).all()
    assert list((tmp_path / "meta_cache").rglob("chunks/**/chunk-*.bin"))  # records came through litdata's cache
    args = ["evaluate", "--manifest", url, "-o", str(tmp_path / "e"), "--backbone", "test_efficientnet", "--weights",
            "none", "--image-size", "32", "--workers", "2", "--wandb", "disabled", "--no-linear", "--compare", "none",
            "--no-embedding-map", "--cache-dir", str(tmp_path / "cache")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e" / "report" / "metrics.json").read_text())["knn_top1"] >= 0
    r = CliRunner().invoke(app, [*args[:2], f"local:{tmp_path / 'nowhere'}", *args[3:4], str(tmp_path / "e2"), *args[5:]])
    assert r.exit_code == 2 and "not a readable shard folder" in r.output and "Traceback" not in r.output
    with pytest.raises(ShardError, match="local folder"):
        write_shards(birds, "s3://bucket/birds")
