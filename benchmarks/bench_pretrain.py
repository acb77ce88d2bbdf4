"""Pretrain throughput: end-to-end img/s (real JPEGs -> views -> train step, through the engine)
against the same model's train step on tensors already in memory (same batch, resolution, device).

The ratio e2e / compute shows what data loading and bookkeeping cost. Uses ../shared/data/cub50
(train split) when present, else synthetic birds. Both figures are measured in the same run.

Usage: python benchmarks/bench_pretrain.py [--method simclr] [--image-size 128] [--batch-size 32] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from finegrain.config import PretrainConfig  # noqa: E402
from finegrain.data.synthetic import make_demo_dataset  # noqa: E402
from finegrain.engine.device import resolve_device  # noqa: E402
from finegrain.stages.pretrain import run_pretrain  # noqa: E402
from finegrain.stages.pretrain_methods import METHODS  # noqa: E402
from finegrain.stages.common import build_backbone  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CUB50_MANIFEST = REPO / "data_manifests" / "cub50.csv"


class _Recorder:
    """A stand-in tracker that keeps the engine's img/s readings."""

    run_id = None

    def __init__(self):
        self.ips = []

    def log(self, metrics, step=None):
        if "train/img_per_s" in metrics and step and step > 10:
            self.ips.append(metrics["train/img_per_s"])

    def summary(self, metrics):
        pass

    def log_artifact(self, *a, **k):
        pass

    def finish(self):
        pass


def compute_rate(cfg: PretrainConfig, steps: int, device) -> float:
    """img/s of forward + backward + optimizer step on one batch held in memory."""
    import timm.optim

    torch.manual_seed(0)
    method = METHODS[cfg.method](build_backbone(cfg)[0], proj_dim=cfg.proj_dim, queue_size=cfg.queue_size).to(device)
    opt = timm.optim.create_optimizer_v2(method, opt=cfg.optimizer, lr=0.01, weight_decay=cfg.weight_decay, momentum=0.9)
    views = [torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device) for _ in range(2)]
    method.train()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        loss, _ = method(views, None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hasattr(method, "after_step"):
            method.after_step(i + 1, steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return cfg.batch_size / statistics.median(times[3:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="simclr", choices=sorted(METHODS))
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if CUB50_MANIFEST.is_file() and (REPO.parent / "shared" / "data" / "cub50").is_dir():
            manifest, data = CUB50_MANIFEST, "cub50 train (real JPEGs)"
        else:
            make_demo_dataset(tmp / "birds", classes=12, per_class=120, image_size=256)
            manifest, data = tmp / "birds" / "manifest.csv", "synthetic birds 256px"
        cfg = PretrainConfig(manifest=str(manifest), out=str(tmp / "run"), method=args.method, backbone=args.backbone,
                             image_size=args.image_size, batch_size=args.batch_size, epochs=100, max_steps=args.steps,
                             workers=args.workers, wandb="disabled", knn_monitor=False, cache_dir=str(tmp / "cache"),
                             device=args.device, queue_size=1024, warmup_epochs=0.0)
        recorder = _Recorder()
        import finegrain.tracking as tracking

        real = tracking.Tracker
        tracking.Tracker = lambda *a, **k: recorder
        try:
            run_pretrain(cfg)
        finally:
            tracking.Tracker = real
        e2e = statistics.median(recorder.ips)
        compute = compute_rate(cfg, 15, device)
    ratio = e2e / compute
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "device": str(device), "torch": torch.__version__, "data": data, "method": args.method, "backbone": args.backbone,
        "image_size": args.image_size, "batch_size": args.batch_size, "workers": args.workers,
        "e2e_img_per_s": round(e2e, 1), "compute_img_per_s": round(compute, 1), "e2e_over_compute": round(ratio, 3),
        "command": "python benchmarks/bench_pretrain.py " + " ".join(sys.argv[1:]),
    }
    out = args.out or REPO / "benchmarks" / "results" / f"pretrain_{args.method}_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.method} {args.backbone} {args.image_size}px batch {args.batch_size} on {device} ({data}):")
    print(f"  end to end {e2e:.1f} img/s, train step on in-memory tensors {compute:.1f} img/s, ratio {ratio:.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
