"""Distributed helpers: one small module, single-process answers when no process group exists.

Everything here works whether or not ``torch.distributed`` was initialised: without a process group,
``rank() == 0``, ``world_size() == 1``, ``is_main()`` is True, ``barrier()`` does nothing and the
gathers return their input. Under ``torchrun`` call ``init_from_env(device_type)`` once at start-up
and ``cleanup()`` at the end.

Gathers concatenate along dim 0 and need the same shape on every rank (use ``drop_last=True``), so
rank ``r``'s rows sit at ``[r * B, (r + 1) * B)`` of the result.

Gradient scaling (what an engine running DDP needs to know): ``gather_with_grad`` uses
``torch.distributed.nn.functional.all_gather``, whose backward *sums* the gradients that every rank
computed for a rank's rows. So if each rank's loss is a mean over its local anchors and the global
loss is ``L = mean_r L_r``, the gradient reaching rank ``r``'s inputs after ``L_r.backward()`` is
``world_size * dL/dx_r``; DDP then *averages* parameter gradients over ranks, and the two factors
cancel: the parameters receive exactly ``dL/dtheta`` of the global loss. Do not multiply the loss by
the world size (``tests/test_dist.py`` checks this with a real DDP model).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist
from torch import Tensor

__all__ = [
    "barrier",
    "cleanup",
    "gather_no_grad",
    "gather_with_grad",
    "init_from_env",
    "is_initialized",
    "is_main",
    "local_rank",
    "rank",
    "world_size",
]


def is_initialized() -> bool:
    """True when torch.distributed is available and a default process group exists."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    """Global rank of this process in ``[0, world_size())``; 0 without a process group."""
    return torch_dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes in the default group; 1 without a process group."""
    return torch_dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """Rank of this process on its machine (torchrun's ``LOCAL_RANK``); 0 without a process group."""
    if not is_initialized():
        return 0
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (and always in a single process): the one process that logs and writes."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if is_initialized():
        torch_dist.barrier()


def gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate every rank's ``t`` along dim 0, keeping the autograd graph.

    Args:
        t: (B, ...) on each rank, same shape, dtype and device on every rank.

    Returns:
        (world_size * B, ...); rows ``[r * B, (r + 1) * B)`` come from rank ``r`` and this rank's own
        slice is ``t`` itself in the graph. Backward sums, over ranks, the gradients each rank
        computed for a slice and hands the sum to the rank that owns it (see the module docstring
        for what that means for DDP). Returns ``t`` unchanged when the world size is 1.
    """
    if world_size() == 1:
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t.contiguous()), dim=0)


def gather_no_grad(t: Tensor) -> Tensor:
    """Concatenate every rank's ``t`` along dim 0 without gradient (e.g. keys for a MoCo queue).

    Args:
        t: (B, ...) on each rank, same shape, dtype and device on every rank.

    Returns:
        (world_size * B, ...), rank ``r``'s rows at ``[r * B, (r + 1) * B)``, detached from the
        graph. Returns ``t.detach()`` when the world size is 1.
    """
    t = t.detach()
    if world_size() == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(world_size())]
    torch_dist.all_gather(parts, t)
    return torch.cat(parts, dim=0)


def init_from_env(device_type: str) -> bool:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    When ``RANK`` and ``WORLD_SIZE`` are set (torchrun also sets ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``), initialise the default group with NCCL for ``device_type == "cuda"`` (after
    selecting GPU ``LOCAL_RANK``) and Gloo otherwise. Calling it again is harmless.

    Args:
        device_type: "cuda", "cpu", ... (the ``torch.device.type`` the model will run on).

    Returns:
        True when a process group exists afterwards (distributed run), False in a single process.
    """
    if is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if not torch_dist.is_available():
        raise RuntimeError("RANK/WORLD_SIZE are set but this torch build has no torch.distributed")
    cuda = device_type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch_dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def broadcast_object(obj):
    """Rank 0's `obj` (any picklable value) on every rank; `obj` itself without a process group."""
    if not is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup() -> None:
    """Destroy the default process group if one exists; a no-op otherwise."""
    if is_initialized():
        torch_dist.destroy_process_group()
