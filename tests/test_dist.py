"""Distributed helpers and gathered losses: 2 gloo processes on CPU against one process.

The 2-process run happens once per module (fixture ``two_ranks``): each rank joins the group through
``finegrain.dist.init_from_env`` (as under torchrun), computes on its half of a fixed global batch and
returns its results (saved by ``conftest.spawn_ranks``); the tests compare them in the parent with the single-process
answers. An exception in a child makes ``torch.multiprocessing`` raise in the parent, and a child
that hangs is terminated after a deadline, so either fails the tests.

Why the gradients compare as they do (W = world size, B = local batch, x_r = rank r's inputs):

* Each rank's loss ``L_r`` is the mean over its own 2B anchors, each contrasted with all 2WB views,
  so every anchor's term is what it is in one process on the global batch, and
  ``L_global = mean_r L_r`` (equal B on every rank).
* ``L_r.backward()`` on rank r gives its inputs ``dL_r/dx_r`` directly plus, through the backward of
  ``torch.distributed.nn.functional.all_gather`` (which sums over ranks), ``dL_j/dx_r`` from every
  other rank j: ``sum_j dL_j/dx_r = W * dL_global/dx_r``. Hence ``x_r.grad / W`` equals rank r's
  slice of the single-process gradient.
* Parameters then get ``W * (dL_global/dx_r)(dx_r/dtheta)`` on rank r, and DDP *averages* over
  ranks: ``(1/W) sum_r W (...) = dL_global/dtheta``. So an engine must NOT multiply the loss by W;
  ``test_ddp_parameter_gradients_equal_single_process`` checks it with a real DDP model.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

from finegrain import dist
from finegrain.losses import nt_xent, update_queue

from conftest import spawn_ranks

WORLD = 2
B_LOCAL = 4
DIM_IN, DIM = 12, 16
TEMPERATURE = 0.1
QUEUE_SIZE, QUEUE_DIM, QUEUE_STEPS = 5, 3, 3
DEADLINE_S = 120


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = WORLD * B_LOCAL
    return torch.randn(n, DIM, generator=g), torch.randn(n, DIM, generator=g)


def _global_images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = WORLD * B_LOCAL
    return torch.randn(n, DIM_IN, generator=g), torch.randn(n, DIM_IN, generator=g)


def _model() -> nn.Module:
    torch.manual_seed(2)
    return nn.Linear(DIM_IN, DIM)


def _queue_keys(rank: int, step: int) -> torch.Tensor:
    """(2, QUEUE_DIM) keys, each row a distinct value that names its rank, step and row."""
    rows = [[100.0 * step + 10.0 * rank + j] * QUEUE_DIM for j in range(2)]
    return torch.tensor(rows)


def _compute(rank: int) -> dict[str, object]:
    """One rank's view of the process group, losses, DDP gradients and MoCo queue (run by spawn_ranks)."""
    res: dict[str, object] = {
        "rank": dist.rank(),
        "world_size": dist.world_size(),
        "local_rank": dist.local_rank(),
        "is_main": dist.is_main(),
        "is_initialized": dist.is_initialized(),
        "gathered_ranks": dist.gather_no_grad(torch.tensor([[float(rank)]])),
    }
    dist.barrier()
    local = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)

    # NT-Xent with gathered negatives, gradients w.r.t. the local inputs
    z1, z2 = _global_batch()
    x1 = z1[local].clone().requires_grad_()
    x2 = z2[local].clone().requires_grad_()
    loss = nt_xent(x1, x2, TEMPERATURE)
    loss.backward()
    res.update(loss=loss.detach(), grad1=x1.grad, grad2=x2.grad)
    res["loss_local_only"] = nt_xent(z1[local], z2[local], TEMPERATURE, gather=False)

    # a real DDP model; both views go through one forward call, as an engine would do
    model = nn.parallel.DistributedDataParallel(_model())
    i1, i2 = _global_images()
    out = model(torch.cat([i1[local], i2[local]]))
    nt_xent(*out.chunk(2), TEMPERATURE).backward()
    res.update(ddp_weight_grad=model.module.weight.grad, ddp_bias_grad=model.module.bias.grad)

    # MoCo queue: each step writes both ranks' keys, in rank order
    queue = torch.zeros(QUEUE_SIZE, QUEUE_DIM)
    ptrs, ptr = [], 0
    for step in range(QUEUE_STEPS):
        ptr = update_queue(queue, _queue_keys(rank, step), ptr)
        ptrs.append(ptr)
    res.update(queue=queue, ptrs=ptrs)

    return res


def _fail(rank: int) -> dict:
    if rank == 1:
        raise RuntimeError("child failure on purpose")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(_compute, WORLD, tmp_path_factory.mktemp("dist"), DEADLINE_S)


def _local(r: int) -> slice:
    return slice(r * B_LOCAL, (r + 1) * B_LOCAL)


# ---------------------------------------------------------------------------------------------
# single process: no process group
# ---------------------------------------------------------------------------------------------


def test_helpers_without_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not dist.is_initialized()
    assert dist.init_from_env("cpu") is False and not dist.is_initialized()
    assert (dist.rank(), dist.world_size(), dist.local_rank()) == (0, 1, 0)
    assert dist.is_main()
    dist.barrier()
    dist.cleanup()

    t = torch.randn(3, 4, requires_grad=True)
    assert dist.gather_with_grad(t) is t
    gathered = dist.gather_no_grad(t)
    assert torch.equal(gathered, t) and not gathered.requires_grad
    # NT-Xent with gather=True is the plain single-process loss
    z = torch.randn(3, 4)
    assert torch.equal(nt_xent(t, z, 0.5), nt_xent(t, z, 0.5, gather=False))


def test_child_failure_fails_the_parent(tmp_path):
    with pytest.raises(Exception, match="on purpose"):
        spawn_ranks(_fail, WORLD, tmp_path, DEADLINE_S, group=False)  # no group: only rank 1 can fail


# ---------------------------------------------------------------------------------------------
# two gloo processes
# ---------------------------------------------------------------------------------------------


def test_helpers_under_two_ranks(two_ranks):
    for r, res in enumerate(two_ranks):
        assert res["rank"] == r and res["local_rank"] == r and res["world_size"] == WORLD
        assert res["is_main"] == (r == 0) and res["is_initialized"]
        assert res["gathered_ranks"].flatten().tolist() == [0.0, 1.0]


def test_mean_of_rank_losses_equals_global_loss(two_ranks):
    z1, z2 = _global_batch()
    expected = nt_xent(z1, z2, TEMPERATURE)
    per_rank = torch.stack([res["loss"] for res in two_ranks])
    assert torch.allclose(per_rank.mean(), expected, atol=1e-6)
    # each rank's own loss is the mean over its anchors of the global per-anchor terms: a rank's
    # loss differs from the global one, and from the loss with local negatives only
    for r, res in enumerate(two_ranks):
        local_only = nt_xent(z1[_local(r)], z2[_local(r)], TEMPERATURE)
        assert torch.allclose(res["loss_local_only"], local_only, atol=1e-6)
        assert not torch.allclose(res["loss"], local_only)


def test_input_gradients_are_world_size_times_single_process(two_ranks):
    z1, z2 = _global_batch()
    z1, z2 = z1.requires_grad_(), z2.requires_grad_()
    nt_xent(z1, z2, TEMPERATURE).backward()
    for r, res in enumerate(two_ranks):
        assert torch.allclose(res["grad1"] / WORLD, z1.grad[_local(r)], atol=1e-6)
        assert torch.allclose(res["grad2"] / WORLD, z2.grad[_local(r)], atol=1e-6)


def test_ddp_parameter_gradients_equal_single_process(two_ranks):
    """DDP's averaging of the gathered loss's gradients is the global gradient: no rescaling."""
    model = _model()
    i1, i2 = _global_images()
    nt_xent(model(i1), model(i2), TEMPERATURE).backward()
    for res in two_ranks:
        assert torch.allclose(res["ddp_weight_grad"], model.weight.grad, atol=1e-6)
        assert torch.allclose(res["ddp_bias_grad"], model.bias.grad, atol=1e-6)


def test_update_queue_holds_both_ranks_keys_in_rank_order(two_ranks):
    expected = torch.zeros(QUEUE_SIZE, QUEUE_DIM)
    ptr, ptrs = 0, []
    for step in range(QUEUE_STEPS):
        for key in torch.cat([_queue_keys(r, step) for r in range(WORLD)]):  # rank 0 then rank 1
            expected[ptr] = key
            ptr = (ptr + 1) % QUEUE_SIZE
        ptrs.append(ptr)
    assert ptrs == [4, 3, 2]  # 4 keys per step into 5 slots: wraps around
    for res in two_ranks:
        assert res["ptrs"] == ptrs
        assert torch.equal(res["queue"], expected)
