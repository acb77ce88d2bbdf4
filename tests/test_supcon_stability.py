"""`supcon --loss ce|supcon_ce` at the default head learning rate on real ImageNet features does not diverge.

The classifier used to be a plain Linear on the pooled features (norms of 10-30 for lite0): at the
default head rate (0.05 at batch 64, SGD momentum 0.9) its cross-entropy rose during the head-only
epoch, and when the backbone joined, the features collapsed to a constant (kNN at chance).
"""

from __future__ import annotations

import json

import pytest
import torch

from finegrain.config import SupconConfig
from finegrain.data.manifest import Manifest
from finegrain.data.synthetic import make_demo_dataset
from finegrain.models.weights import BUILTIN_WEIGHTS
from finegrain.stages.supcon import run_supcon


@pytest.fixture(scope="module")
def birds16(tmp_path_factory) -> Manifest:
    out = tmp_path_factory.mktemp("birds16")
    return make_demo_dataset(out, classes=8, per_class=16, image_size=96, seed=5)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "supcon_ce"])
def test_cross_entropy_heads_train_at_the_default_rate(birds16, tmp_path, loss, request):
    if not BUILTIN_WEIGHTS["tf_efficientnet_lite0"].installed():
        pytest.skip("offline lite0 weights not installed")
    # One thread: CPU reductions depend on the thread count, and on 32 test photos one photo is the margin
    # (at 2 threads the ce run's last kNN was 0.219 on the code before and after the issue-30 reshape alike).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    cfg = SupconConfig(manifest=str(birds16.root / "manifest.csv"), out=str(tmp_path / loss), loss=loss,
                       image_size=64, batch_size=32, classes_per_batch=8, lr=0.05, epochs=4, workers=0,
                       wandb="disabled", cache_dir=str(tmp_path / "cache"), log_every=1, classifier=False,
                       knn_monitor_share=1.0)  # a reading after every epoch
    art = run_supcon(cfg)
    lines = [json.loads(x) for x in (art.path / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    warmup = art.config()["head_warmup_steps"]
    # The head-only epoch lowers the loss, and so does the rest of the run.
    assert min(losses[warmup - 2: warmup]) < losses[0], losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    # The embedding never collapses: kNN stays well above chance (1/8) after every epoch.
    knn = [x["monitor/knn_top1_test"] for x in lines if "monitor/knn_top1_test" in x]
    assert len(knn) == cfg.epochs + 1 and min(knn) > 2 / 8, knn
