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


def cached_features(folder, pattern: str = "*") -> dict:
    """{file name: (N, D) float32 array} of the feature caches in `folder` whose names match `pattern` (without suffix),
    oldest first: .npy files, and the .safetensors of runs made before features were written in chunks."""
    from pathlib import Path

    import numpy as np
    from safetensors.numpy import load_file

    files = sorted([*Path(folder).glob(f"{pattern}.npy"), *Path(folder).glob(f"{pattern}.safetensors")],
                   key=lambda p: p.stat().st_mtime)
    return {p.name: np.load(p) if p.suffix == ".npy" else load_file(p)["features"] for p in files}
