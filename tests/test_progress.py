"""Progress in a log that is not a terminal: one line per epoch, no blank lines from redrawn bars."""

from __future__ import annotations

import re
import subprocess
import sys


def test_a_piped_training_log_has_a_line_per_epoch_and_no_blank_lines(birds, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "finegrain", "supcon", "--manifest", str(birds.root / "manifest.csv"),
         "--out", str(tmp_path / "s"), "--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32",
         "--epochs", "2", "--batch-size", "8", "--classes-per-batch", "4", "--workers", "0", "--wandb", "disabled",
         "--no-knn-monitor", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=600, env={"NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    log = out.stdout + out.stderr
    epochs = re.findall(r"epoch (\d)/2: step (\d+)/(\d+), mean loss [\d.]+", log)
    assert [e[0] for e in epochs] == ["1", "2"] and epochs[-1][1] == epochs[-1][2]
    assert "\n\n" not in log.strip() and "\r" not in log
