"""Training-state checkpoints: one file, written atomically, loaded without running pickle code."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from finegrain.errors import FinegrainError
from finegrain.fsutil import atomic_path

CHECKPOINT_FILE = "checkpoint.pt"


def rng_state() -> dict:
    """Every RNG a training step may touch, as tensors and plain types (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir, state: dict) -> Path:
    """Write `state` to out_dir/checkpoint.pt atomically (the previous file stays valid until the rename).

    Raises:
        FinegrainError: the write failed (disk full, read-only folder); the previous checkpoint is intact.
    """
    path = Path(out_dir) / CHECKPOINT_FILE
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except OSError as e:
        raise FinegrainError(f"could not write checkpoint {path} ({e.strerror or e}); the previous checkpoint is unchanged") from None
    return path


def load_checkpoint(out_dir, map_location="cpu") -> dict | None:
    """The checkpoint in out_dir, or None. Loads with weights_only=True: no pickle code runs."""
    path = Path(out_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise FinegrainError(f"{path} is not a valid finegrain checkpoint and was not loaded ({type(e).__name__}: {e})") from None


def stored_wandb_run_id(out_dir) -> str | None:
    """The W&B run id saved in `out_dir`'s checkpoint (so a resumed run continues the same W&B run)."""
    ckpt = load_checkpoint(out_dir)
    return ckpt.get("wandb_run_id") if ckpt else None
