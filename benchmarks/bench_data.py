"""Data-loading throughput: decoding JPEGs every epoch vs. the decoded-image cache vs. shards.

Measures, in one run and on the same images, img/s of a DataLoader that serves two SimCLR views
per image (what the contrastive stages consume), for:
  decode_full   full-resolution JPEG decoding every epoch
  decode_draft  reduced-scale JPEG decoding (libjpeg DCT scaling) every epoch
  cache         pixels read from the uint8 memory-map cache (built once; build time reported)
  shards        records read from `finegrain manifest shard` shards (litdata; --max-side 512, written
                once: time and size reported) and decoded every epoch
plus manifest validation speed. Uses ../shared/data/cub50 when present, else synthetic birds.
--camera-side S first upscales the photos so their longer side is S px (JPEG quality 90), standing in
for camera photos.

Usage: python benchmarks/bench_data.py [--image-size 128] [--workers 2] [--epochs 3] [--limit N] [--camera-side 2000]
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
from torch.utils.data import DataLoader  # noqa: E402

from finegrain.data.cache import DecodedImageCache  # noqa: E402
from finegrain.data.dataset import ManifestDataset  # noqa: E402
from finegrain.data.importers import import_cub  # noqa: E402
from finegrain.data.manifest import Manifest  # noqa: E402
from finegrain.data.shards import write_shards  # noqa: E402
from finegrain.data.synthetic import make_demo_dataset  # noqa: E402
from finegrain.data.validate import validate_manifest  # noqa: E402
from finegrain.data.views import build_view, make_recipe  # noqa: E402
from _results import write_results  # noqa: E402 (benchmarks/ is on sys.path when a script here runs)

REPO = Path(__file__).resolve().parents[1]
CUB50 = Path(os.environ.get("FINEGRAIN_CUB50", REPO.parent / "shared" / "data" / "cub50"))


def load_data(tmp: Path, limit: int | None) -> tuple[Manifest, str]:
    if (CUB50 / "images.txt").is_file():
        m, name = import_cub(CUB50).select("train"), "cub50 train (real JPEGs)"
    else:
        m, name = make_demo_dataset(tmp / "birds", classes=12, per_class=120, image_size=256).select("train"), "synthetic birds 256px"
    if limit:
        m = Manifest(m.table.iloc[:limit].reset_index(drop=True), m.root)
    return m, name


def upscaled(manifest: Manifest, tmp: Path, side: int) -> Manifest:
    """The same rows with each photo upscaled (bicubic) so its longer side is `side` px, as JPEG quality 90 in tmp."""
    import cv2
    from PIL import Image

    for i, rel in enumerate(manifest.table["path"]):
        pixels = manifest.decode(i).pixels
        h, w = pixels.shape[:2]
        big = cv2.resize(pixels, (round(w * side / max(h, w)), round(h * side / max(h, w))), interpolation=cv2.INTER_CUBIC)
        (tmp / "camera" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(big).save(tmp / "camera" / rel, quality=90)
    return Manifest(manifest.table, tmp / "camera")


def epoch_rate(ds, workers: int, batch: int, epochs: int) -> list[float]:
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=workers > 0, drop_last=False)
    rates = []
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for views, labels, _ in loader:
            n += labels.shape[0]
        rates.append(n / (time.perf_counter() - t0))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images")
    ap.add_argument("--camera-side", type=int, default=None, help="upscale the photos to this longer side first")
    ap.add_argument("--max-side", type=int, default=512, help="shards: shorter side of the stored photos")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "data_loading.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        manifest, name = load_data(tmp, args.limit)
        if args.camera_side:
            manifest, name = upscaled(manifest, tmp, args.camera_side), f"{name}, upscaled to {args.camera_side} px"
        t0 = time.perf_counter()
        report = validate_manifest(manifest)
        validate_s = time.perf_counter() - t0
        view = build_view(make_recipe("simclr", image_size=args.image_size))
        side = round(args.image_size / 0.875)
        results = {}
        for mode in ("decode_full", "decode_draft", "cache", "shards"):
            cache, build_s, rows = None, None, manifest
            if mode == "cache":
                t0 = time.perf_counter()
                cache = DecodedImageCache.open_or_build(manifest, tmp / "cache", shorter_side=side, progress=False)
                build_s = time.perf_counter() - t0
            if mode == "shards":
                t0 = time.perf_counter()
                info = write_shards(manifest, tmp / "shards", max_side=args.max_side)
                build_s, rows = time.perf_counter() - t0, Manifest.load(tmp / "shards")
            ds = ManifestDataset(rows, view, n_views=2, cache=cache, decode_min_side=side if mode != "decode_full" else None)
            rates = epoch_rate(ds, args.workers, args.batch_size, args.epochs)
            results[mode] = {"img_per_s_epochs": [round(r, 1) for r in rates], "img_per_s_median": round(statistics.median(rates), 1)}
            if cache is not None:
                results[mode].update(build_s=round(build_s, 2), cache_mb=round(cache.nbytes / 1e6, 1))
            if mode == "shards":
                results[mode].update(build_s=round(build_s, 2), cache_mb=round(info["bytes"] / 1e6, 1),
                                     shards=info["shards"], max_side=args.max_side)
    base = results["decode_full"]["img_per_s_median"]
    for mode in results:
        results[mode]["speedup_vs_decode_full"] = round(results[mode]["img_per_s_median"] / base, 2)
    out = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "python": sys.version.split()[0], "torch": torch.__version__, "data": name, "images": len(manifest),
        "image_size": args.image_size, "views": 2, "workers": args.workers, "batch_size": args.batch_size,
        "validate_s": round(validate_s, 2), "validate_img_per_s": round(len(manifest) / validate_s, 1),
        "validate_ok": report.ok, "loading": results,
        **({"figures": {"shards_read_img_per_s_cub50": results["shards"]["img_per_s_median"]}}
           if "cub50" in name and "shards" in results else {}),
        "command": "python benchmarks/bench_data.py " + " ".join(sys.argv[1:]),
    }
    write_results(args.out, out)
    print(f"data: {name}, {len(manifest)} images, 2 SimCLR views at {args.image_size}px, {args.workers} workers")
    print(f"validate: {validate_s:.1f} s ({out['validate_img_per_s']} img/s)")
    print(f"{'mode':<14}{'img/s (median)':>16}{'x decode_full':>15}  notes")
    for mode, r in results.items():
        note = f"build {r['build_s']} s, {r['cache_mb']} MB" if "build_s" in r else ""
        print(f"{mode:<14}{r['img_per_s_median']:>16}{r['speedup_vs_decode_full']:>15}  {note}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
