"""Shared by the benchmark scripts that drive the `finegrain` command line."""

from __future__ import annotations

import subprocess
import sys
import time


def finegrain(*args: str) -> float:
    """Run one `python -m finegrain ...` command (raises if it fails); returns its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "finegrain", *args], check=True)
    return time.perf_counter() - start
