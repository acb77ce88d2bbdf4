"""Files from elsewhere never run code: pickles passed as weights or planted as a checkpoint or as an
artifact's weights are refused with a clear message, and pipeline YAML is read with the safe loader.
Each payload writes a marker file when unpickled; the marker must never appear."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from finegrain.artifacts import file_sha256
from finegrain.cli import app

from conftest import WritesAFile

SMALL = ["--backbone", "test_efficientnet", "--image-size", "32", "--workers", "0", "--wandb", "disabled"]
TRAIN = [*SMALL, "--batch-size", "8", "--epochs", "1", "--no-knn-monitor"]


def _payload(tmp_path):
    marker = tmp_path / "pwned"
    return marker, {"conv_stem.weight": torch.zeros(1), "evil": WritesAFile(str(marker))}


def _invoke(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r


@pytest.mark.parametrize("stage", ["pretrain", "supcon", "evaluate"])
def test_malicious_weights_option_is_refused(birds, tmp_path, stage):
    marker, payload = _payload(tmp_path)
    torch.save(payload, tmp_path / "evil.pth")
    options = SMALL if stage == "evaluate" else TRAIN + (["--classes-per-batch", "4"] if stage == "supcon" else [])
    r = _invoke(stage, "--manifest", birds.root / "manifest.csv", "-o", tmp_path / "out", *options,
                "--weights", tmp_path / "evil.pth", "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 2 and "refused" in r.output, r.output
    assert not marker.exists()


def test_malicious_checkpoint_is_refused_on_resume(birds, tmp_path):
    marker, payload = _payload(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"method": payload, "step": 1}, out / "checkpoint.pt")
    r = _invoke("pretrain", "--manifest", birds.root / "manifest.csv", "-o", out, *TRAIN, "--weights", "none",
                "--cache-dir", tmp_path / "cache", "--resume")
    assert r.exit_code == 2 and "not a valid finegrain checkpoint" in r.output, r.output
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(out / "checkpoint.pt", weights_only=False)
    assert marker.exists()


def test_artifact_whose_weights_are_a_pickle_is_refused(birds, tmp_path):
    """A hand-made artifact folder with a consistent hash, but a pickle where the safetensors should be."""
    marker, payload = _payload(tmp_path)
    art = tmp_path / "art"
    art.mkdir()
    torch.save(payload, art / "model.safetensors")
    info = {"stage": "pretrain", "complete": True, "backbone": "test_efficientnet", "image_size": 32,
            "mean": [0.5] * 3, "std": [0.5] * 3, "embedding_dim": 8, "weights_sha256": file_sha256(art / "model.safetensors"),
            "artifact_hash": "0" * 64}
    (art / "artifact.json").write_text(json.dumps(info))
    for stage in ("supcon", "evaluate"):
        extra = [*TRAIN[-5:], "--classes-per-batch", "4"] if stage == "supcon" else []
        r = _invoke(stage, "--manifest", birds.root / "manifest.csv", "-o", tmp_path / stage, "--from", art,
                    "--workers", "0", "--wandb", "disabled", "--cache-dir", tmp_path / "cache", *extra)
        assert r.exit_code == 2 and "safetensors" in r.output, (stage, r.output)
    assert not marker.exists()


def test_pipeline_yaml_cannot_build_python_objects(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"data: !!python/object/apply:builtins.open ['{marker}', 'w']\nstages: {{}}\n")
    r = _invoke("run", path)
    assert r.exit_code == 2, r.output
    assert not marker.exists()
