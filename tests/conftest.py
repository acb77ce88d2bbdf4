"""Shared fixtures: small synthetic bird datasets, odd image files and the real cub50 birds."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402

from finegrain.data.manifest import Manifest  # noqa: E402
from finegrain.data.synthetic import make_demo_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CUB50 = Path(os.environ.get("FINEGRAIN_CUB50", REPO.parent / "shared" / "data" / "cub50"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """FINEGRAIN_CACHE (the decoded-image cache a test names no --cache-dir for, and the shared features cache)
    in a folder of this session, never the user's ~/.cache/finegrain; subprocesses inherit it."""
    before = os.environ.get("FINEGRAIN_CACHE")
    os.environ["FINEGRAIN_CACHE"] = str(tmp_path_factory.mktemp("finegrain_cache"))
    yield
    if before is None:
        os.environ.pop("FINEGRAIN_CACHE", None)
    else:
        os.environ["FINEGRAIN_CACHE"] = before


@pytest.fixture(scope="session")
def cub50() -> Path:
    """The real 50-species CUB subset; tests using it skip when it is absent."""
    if not (CUB50 / "images.txt").is_file():
        pytest.skip(f"real CUB data not found at {CUB50} (set FINEGRAIN_CUB50)")
    return CUB50


@pytest.fixture(scope="session")
def _birds_master(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("birds_master")
    make_demo_dataset(out, classes=4, per_class=8, image_size=64, seed=3)
    return out


@pytest.fixture
def birds(_birds_master, tmp_path) -> Manifest:
    """A fresh, writable copy of a small synthetic dataset (4 species x 8 images, 64 px): tests may break it."""
    dst = tmp_path / "birds"
    shutil.copytree(_birds_master, dst)
    return Manifest.load(dst / "manifest.csv")


class Crash(Exception):
    """Raised by `crash_after_step` to stand in for a killed training run."""


def crash_after_step(monkeypatch, method_cls, step: int) -> None:
    """Make `method_cls.after_step` raise Crash right after optimizer step `step` (undo with monkeypatch.undo())."""
    original = method_cls.after_step

    def crashing(self, current, total):
        original(self, current, total)
        if current == step:
            raise Crash()

    monkeypatch.setattr(method_cls, "after_step", crashing)


def assert_resume_is_bit_exact(run, make_cfg, monkeypatch, method_cls, crash_step: int) -> None:
    """A run cut after `crash_step` optimizer steps, then resumed, ends with the weights of an uninterrupted one.

    run: a stage function (config -> Artifact); make_cfg(name, **overrides) -> its config writing to folder `name`.
    """
    import torch
    from safetensors.torch import load_file

    full = run(make_cfg("full"))
    crash_after_step(monkeypatch, method_cls, crash_step)
    with pytest.raises(Crash):
        run(make_cfg("cut"))
    monkeypatch.undo()
    resumed = run(make_cfg("cut", resume=True))
    a, b = load_file(full.path / "model.safetensors"), load_file(resumed.path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class WritesAFile:
    """Unpickling this calls open(marker, "w"): a stand-in for any code an attacker would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _run_rank(rank: int, compute, world: int, port: int, out_dir: str, group: bool) -> None:
    """One spawned rank: join a gloo group as torchrun would (if `group`), save ``compute(rank)`` to rank{rank}.pt."""
    import torch

    from finegrain import dist

    torch.set_num_threads(1)
    if not group:
        torch.save(compute(rank), Path(out_dir) / f"rank{rank}.pt")
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    assert dist.init_from_env("cpu")
    try:
        torch.save(compute(rank), Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears the group down while the other still talks to it (gloo aborts)
    finally:
        dist.cleanup()
    # The result is on disk. Leave without interpreter finalisation: there gloo's worker threads can
    # still be torn down after Python is gone ("terminate called without an active exception",
    # SIGABRT; about one run in three of the whole suite), which would fail a test that passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(compute, world: int, out_dir, deadline_s: float = 120.0, *, group: bool = True) -> list[dict]:
    """Run ``compute(rank) -> dict`` in `world` processes joined in one gloo process group (torch.multiprocessing,
    a free local port) and return each rank's dict, in rank order. Raises if one rank fails (join re-raises it);
    fails the test if they hang past deadline_s. `compute` must be a module-level function (it is pickled).
    group=False runs the ranks without a process group."""
    import socket
    import time

    import torch
    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(_run_rank, args=(compute, world, port, str(out_dir), group), nprocs=world, join=False)
    deadline = time.monotonic() + deadline_s
    while not ctx.join(timeout=1):  # join raises ProcessRaisedException / ProcessExitedException
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"distributed workers did not finish within {deadline_s} s")
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world)]
