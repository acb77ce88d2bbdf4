"""Two "nodes" on localhost: two torchrun invocations with --nnodes 2 (c10d rendezvous, gloo, one process each)
train one artifact, equal to the single-node two-process run on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from finegrain.artifacts import load_artifact

TRAIN = ["supcon", "--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32", "--batch-size", "8",
         "--classes-per-batch", "4", "--epochs", "2", "--workers", "0", "--wandb", "disabled", "--proj-dim", "16",
         "--no-knn-monitor", "--log-every", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_the_artifact_of_one_node_with_two_processes(birds, tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--manifest", str(birds.root / "manifest.csv"), "--cache-dir", str(tmp_path / "cache")]

    single = tmp_path / "single"
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "finegrain", *TRAIN, *args,
                        "-o", str(single)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]

    two = tmp_path / "two_nodes"
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen([torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "finegrain-test",
                               "-m", "finegrain", *TRAIN, *args, "-o", str(two)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]

    # one artifact, written once (by global rank 0), with the single-node run's steps and weights
    assert load_artifact(two).info["metrics"]["steps"] == load_artifact(single).info["metrics"]["steps"]
    a, b = load_file(single / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)
