"""SIGKILL a training run at several points (mid-epoch, mid-checkpoint-write, mid-artifact-write), then
resume it: the resumed run must end with exactly the weights of an uninterrupted run, and nothing
half-written is ever loaded."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from finegrain.artifacts import load_artifact
from finegrain.cli import app
from finegrain.data.split import keep_label_fraction
from finegrain.errors import FinegrainError
from finegrain.stages.pseudo_label import PSEUDO_LABELS_FILE

KILLER = Path(__file__).with_name("killed_run.py")
# 24 train images, batches of 8 -> 3 steps an epoch, 6 in all; checkpoints after steps 2, 3 (epoch end), 4, 6.
TRAIN = ["--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32", "--batch-size", "8",
         "--epochs", "2", "--workers", "0", "--wandb", "disabled", "--no-knn-monitor", "--checkpoint-every", "2"]
STAGE_ARGS = {"pretrain": ["--method", "simclr"], "supcon": ["--classes-per-batch", "4", "--proj-dim", "32"]}


def _args(stage, birds_root: Path, out: Path, cache: Path) -> list[str]:
    return [stage, "--manifest", str(birds_root / "manifest.csv"), "-o", str(out), "--cache-dir", str(cache),
            *TRAIN, *STAGE_ARGS[stage]]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(_birds_master, tmp_path_factory):
    """stage -> weights of a run that was never stopped."""
    base = tmp_path_factory.mktemp("uninterrupted")
    done = {}
    for stage in STAGE_ARGS:
        r = CliRunner().invoke(app, _args(stage, _birds_master, base / stage, base / "cache"))
        assert r.exit_code == 0, r.output
        done[stage] = _weights(base / stage)
    return done


@pytest.mark.parametrize("stage, point", [
    ("pretrain", "step:5"),        # mid-epoch, one step after the last checkpoint
    ("pretrain", "checkpoint:1"),  # the first checkpoint half-written: nothing valid to resume from yet
    ("pretrain", "checkpoint:2"),  # the second half-written: the first must be the one resumed
    ("pretrain", "artifact:1"),    # training done, weights half-written, artifact.json never written
    ("supcon", "step:4"),          # P x K sampler, mid-epoch
])
def test_sigkill_then_resume_gives_the_uninterrupted_weights(_birds_master, tmp_path, uninterrupted, stage, point):
    out, cache = tmp_path / "run", tmp_path / "cache"
    killed = subprocess.run([sys.executable, str(KILLER), point, *_args(stage, _birds_master, out, cache)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    # Nothing half-written is taken for finished work.
    assert not (out / "artifact.json").exists()
    with pytest.raises(FinegrainError, match="not a complete artifact"):
        load_artifact(out)
    if not point.startswith("step"):
        assert list(out.glob(".*.tmp")), "the kill should have left the half-written temporary file behind"
    if (out / "checkpoint.pt").exists():  # what is under the final name is always a whole checkpoint
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert 0 < state["step"] <= 6

    # Without --resume the folder is not silently overwritten; with it, the run finishes.
    if (out / "checkpoint.pt").exists():
        r = CliRunner().invoke(app, _args(stage, _birds_master, out, cache))
        assert r.exit_code == 2 and "--resume" in r.output
    r = CliRunner().invoke(app, [*_args(stage, _birds_master, out, cache), "--resume"])
    assert r.exit_code == 0, r.output
    resumed = _weights(out)
    expected = uninterrupted[stage]
    assert resumed.keys() == expected.keys()
    for k in expected:
        assert torch.equal(resumed[k], expected[k]), k
    assert load_artifact(out).info["stage"] == stage
    assert not list(out.glob(".*.tmp")), "the resumed run should clear the dead run's temporary files"


PSEUDO_LABEL = ["--backbone", "test_efficientnet", "--weights", "none", "--image-size", "36", "--batch-size", "4",
                "--workers", "0", "--wandb", "disabled", "--rounds", "3"]


@pytest.mark.parametrize("point", ["features:2", "round:4"])  # mid-extraction; while choosing the rounds
def test_a_sigkilled_pseudo_label_run_run_again_names_the_photos_an_uninterrupted_one_names(birds, tmp_path, point):
    keep_label_fraction(birds, 0.5, seed=0).save(birds.root / "few.csv")
    args = lambda name: ["pseudo-label", "--manifest", str(birds.root / "few.csv"), "--out", str(tmp_path / name),  # noqa: E731
                         "--features-dir", str(tmp_path / f"features-{name}"), *PSEUDO_LABEL]
    r = CliRunner().invoke(app, args("whole"))
    assert r.exit_code == 0, r.output
    killed = subprocess.run([sys.executable, str(KILLER), point, *args("killed")], capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "artifact.json").exists()

    r = CliRunner().invoke(app, args("killed"))  # the same command again
    assert r.exit_code == 0, r.output
    if point.startswith("features"):
        assert "resumes at photo 9 of" in r.output  # two batches of 4 were kept
    whole, again = tmp_path / "whole", tmp_path / "killed"
    assert (again / PSEUDO_LABELS_FILE).read_text() == (whole / PSEUDO_LABELS_FILE).read_text()
    expected, resumed = _weights(whole), _weights(again)
    for k in ("classifier.weight", "classifier.bias"):
        assert torch.allclose(resumed[k], expected[k], atol=1e-5), k
    assert load_artifact(again).info["pseudo_labels"] == load_artifact(whole).info["pseudo_labels"]
