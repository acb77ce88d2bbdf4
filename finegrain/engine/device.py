"""Device and mixed-precision choices."""

from __future__ import annotations

import torch

from finegrain.errors import FinegrainError


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cuda" without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FinegrainError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise FinegrainError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `--amp` (None = full float32).

    auto: bfloat16 on GPUs that support it, float16 on older GPUs, off on CPU (where bf16 autocast
    is slower than float32 for these convolutional backbones on most CPUs; ask for it explicitly).
    """
    if name == "off":
        return None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        if device.type != "cuda":
            raise FinegrainError("--amp fp16 needs a CUDA device; use bf16 or off on CPU")
        return torch.float16
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    raise FinegrainError(f"--amp must be auto, off, bf16 or fp16, got {name!r}")
