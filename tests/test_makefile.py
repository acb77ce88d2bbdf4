"""The Makefile's install step: one line per step, pip's output in .venv/pip.log, its tail when pip fails.

The real recipe runs, with a stand-in Python whose venv's pip prints a page of lines (no network)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# `FAKE -m venv DIR` makes DIR/bin/python, whose `-m pip install ...` prints 60 lines and exits with $PIP_EXIT.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin"
  cp "$0" "$3/bin/python"
  exit 0
fi
for i in $(seq 1 60); do echo "Collecting package-$i (from finegrain==0.1) pip-line-$i"; done
echo "pip was called with: $*"
exit "${PIP_EXIT:-0}"
"""


def _make(tmp_path: Path, pip_exit: int) -> subprocess.CompletedProcess:
    """`make venv` in a folder holding the Makefile, a pyproject.toml and the stand-in Python."""
    fake = tmp_path / "fake_python"
    if not fake.exists():
        shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
        (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
        fake.write_text(FAKE_PYTHON)
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return subprocess.run(["make", "--no-print-directory", "-C", str(tmp_path), "venv", f"PYTHON={fake}"],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PIP_EXIT": str(pip_exit)},
                          timeout=60)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_install_prints_one_line_per_step(tmp_path):
    r = _make(tmp_path, pip_exit=0)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) <= 5 and "pip-line" not in r.stdout and not r.stderr, lines
    log = (tmp_path / ".venv" / "pip.log").read_text()
    assert log.count("pip-line-") == 120 and "-e .[dev]" in log  # both pip steps' output is in the log
    assert (tmp_path / ".venv" / ".finegrain-installed").is_file()
    again = _make(tmp_path, pip_exit=0)  # installed: nothing to do, nothing printed
    assert again.returncode == 0 and "pip" not in again.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_a_failing_pip_shows_the_end_of_its_log(tmp_path):
    r = _make(tmp_path, pip_exit=1)
    assert r.returncode != 0
    assert "pip failed while upgrading pip" in r.stdout and "pip-line-60" in r.stdout  # the tail is shown
    assert "pip-line-1 " not in r.stdout + "\n" and "pip.log" in r.stdout  # not the whole page
    assert not (tmp_path / ".venv" / ".finegrain-installed").exists()
