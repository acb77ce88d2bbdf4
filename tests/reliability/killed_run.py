"""Run one `finegrain` command in this process and SIGKILL it at a chosen point (for test_kill_resume).

    python killed_run.py POINT:N finegrain-args...

POINT is where the process kills itself, without any cleanup (no finally blocks, no atexit):
    step:N        just before optimizer step N+1 starts (N steps are done)
    checkpoint:N  in the middle of writing the N-th checkpoint: half its bytes are on disk
    artifact:N    in the middle of writing the artifact's weights (N is ignored)
    features:N    when N batches of photo features are written, each flushed (extraction resumes from the file)
    round:N       right after pseudo-label's N-th labelling round (those that choose the rounds count too)

Only the test imports this; the package has no kill hooks of its own.
"""

from __future__ import annotations

import io
import os
import signal
import sys

import torch


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _half_write(data: bytes, path) -> None:
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    _die()


def install(point: str, n: int) -> None:
    """Patch the library so that this process SIGKILLs itself at `point` number `n`."""
    if point == "step":
        from timm.scheduler import CosineLRScheduler  # the engine's scheduler; step_update runs once a step

        original = CosineLRScheduler.step_update

        def step_update(self, num_updates, *args, **kwargs):
            if num_updates == n:
                _die()
            return original(self, num_updates, *args, **kwargs)

        CosineLRScheduler.step_update = step_update
    elif point == "checkpoint":
        calls = {"n": 0}
        real_save = torch.save

        def save(obj, path, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] < n:
                return real_save(obj, path, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            _half_write(buffer.getvalue(), path)

        torch.save = save  # only checkpoints are written with torch.save (weights go to safetensors)
    elif point == "artifact":
        from safetensors.torch import save as to_bytes

        from finegrain import artifacts

        def save_file(tensors, path, metadata=None):
            _half_write(to_bytes(tensors, metadata=metadata), path)

        artifacts.save_file = save_file
    elif point == "features":
        from finegrain.features import feature_file, store

        feature_file.FLUSH_SECONDS = 0.0  # every batch reaches the disk before the next one starts

        batches = store.feature_batches

        def feature_batches(*args, **kwargs):
            for i, batch in enumerate(batches(*args, **kwargs)):
                if i == n:
                    _die()
                yield batch

        store.feature_batches = feature_batches
    elif point == "round":
        from finegrain.curation import pseudo_labels

        rounds, done = pseudo_labels.label_rounds, {"n": 0}

        def label_rounds(*args, on_round=None, **kwargs):
            def then(r, probe):
                done["n"] += 1
                if done["n"] == n:
                    _die()
                if on_round is not None:
                    on_round(r, probe)
            return rounds(*args, on_round=then, **kwargs)

        pseudo_labels.label_rounds = label_rounds
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    where, count = sys.argv[1].split(":")
    install(where, int(count))
    from finegrain.cli import app

    app(sys.argv[2:], prog_name="finegrain")
