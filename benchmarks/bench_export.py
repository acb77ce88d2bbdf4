"""`finegrain export` against `finegrain predict` on cub50 test photos: agreement, accuracy, int8, speed, install size.

1. Export the artifact (fp32, and int8 calibrated on 200 train photos of the manifest) unless --export-dir has it.
2. Every test photo through `finegrain predict` (torch eager) and through the runner with fp32 and int8:
   top-1 agreement with predict, top-1 accuracy, `unknown` decisions.
3. Speed, one process, side by side (the three engines take turns, so load on the machine hits them alike):
   decoded photos (uint8) in, probabilities and open-set score out; JPEG decoding is outside for all three.
   torch eager = predict's path (albumentations view, channels-last backbone, flip averaging, classifier,
   open-set score); batch 1 over --photos-1 photos, batch 32 over batches of same-size photos (a camera's
   frames share one size; the exported graph takes one size per batch). p50/p95 latency per batch, img/s.
4. Install: the runner's wheel set (numpy, Pillow, onnxruntime and what they pull) against this environment.

Usage:
  python benchmarks/bench_export.py --artifact /tmp/cub_supcon [--runtime-venv /tmp/rt --wheels /tmp/rt-wheels]
Writes benchmarks/results/export.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from _results import write_results

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data_manifests" / "cub50.csv"


def export(artifact: Path, out: Path, manifest: Path, per_channel: bool = False) -> dict:
    """export.json of `out`, exporting first when it is missing or from another artifact."""
    from finegrain.artifacts import load_artifact
    from finegrain.config import ExportConfig
    from finegrain.export.command import run_export

    record_file = out / "export.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if (record["parent"]["hash"] == load_artifact(artifact).hash and record.get("int8")
                and record["int8"]["per_channel"] == per_channel):
            return record
    start = time.perf_counter()
    record = run_export(ExportConfig(artifact=artifact, out=out, int8=True, calibration_manifest=manifest,
                                     per_channel=per_channel))
    record["export_seconds"] = time.perf_counter() - start
    return record


def agreement(artifact: Path, out: Path, manifest) -> dict:
    """predict (torch) vs the runner (fp32, int8) on every test photo: top-1, accuracy, unknown decisions."""
    from finegrain.runtime import runner
    from finegrain.stages.predict import run_predict

    test = manifest.rows("test")
    photos = [test.root / p for p in test.table["path"]]
    labels = np.array(test.table["label"])
    start = time.perf_counter()
    want = run_predict(artifact, photos, top_k=1, workers=2)
    result = {"photos": len(photos), "predict_seconds": time.perf_counter() - start}
    top1 = {"predict": np.array(want["nearest_species"]), "known": {"predict": np.array(want["known"], bool)}}
    for name in ("model.onnx", "model.int8.onnx"):
        start = time.perf_counter()
        rows, _ = runner.predict(runner.load_model(out / name), photos, top_k=1)
        key = "fp32" if name == "model.onnx" else "int8"
        result[f"{key}_seconds"] = time.perf_counter() - start
        top1[key] = np.array([r["nearest_species"] for r in rows])
        top1["known"][key] = np.array([r["known"] for r in rows], bool)
    known_photos = np.isin(labels, sorted(set(manifest.rows("train").table["label"])))
    for key in ("predict", "fp32", "int8"):
        result[f"{key}_top1"] = float((top1[key] == labels)[known_photos].mean())
        if key != "predict":
            result[f"{key}_agrees_with_predict"] = float((top1[key] == top1["predict"]).mean())
            result[f"{key}_same_unknown_decision"] = float((top1["known"][key] == top1["known"]["predict"]).mean())
    result["fp32_vs_int8_agreement"] = float((top1["fp32"] == top1["int8"]).mean())
    return result


class TorchPredict:
    """predict's path on decoded photos: albumentations eval view, channels-last backbone (flip-averaged as the
    classifier was fitted), L2 norm, stored classifier softmax, open-set score."""

    def __init__(self, artifact_dir: Path):
        import torch

        from finegrain.artifacts import load_artifact
        from finegrain.data.views import build_view
        from finegrain.features.extract import flip_averaged, ready_for_extraction
        from finegrain.models.backbone import create_backbone
        from finegrain.stages.predict import open_set_reference, reading

        art = load_artifact(artifact_dir)
        recipe, flip = reading(art.info)
        self.view = build_view(recipe)
        model = ready_for_extraction(create_backbone(art.info["backbone"], weights=art.path), torch.device("cpu"))
        self.embed = flip_averaged(model) if flip else model
        self.head = art.state_dict("classifier.")
        self.reference = open_set_reference(art, None)
        self.torch = torch

    def __call__(self, batch: list[np.ndarray]):
        torch = self.torch
        with torch.no_grad():
            x = torch.stack([self.view(p) for p in batch]).contiguous(memory_format=torch.channels_last)
            feats = self.embed(x).float()
            probs = (torch.nn.functional.normalize(feats, dim=1) @ self.head["weight"].T + self.head["bias"]).softmax(1)
            return probs, self.reference.scores(feats)


def timings(engines: dict, batches: list[list[np.ndarray]], warmup: int = 2) -> dict:
    """{engine: {p50_ms, p95_ms, img_per_s}}: each batch through every engine in turn."""
    for name, run in engines.items():
        for batch in batches[:warmup]:
            run(batch)
    seconds = defaultdict(list)
    for batch in batches:
        for name, run in engines.items():
            start = time.perf_counter()
            run(batch)
            seconds[name].append(time.perf_counter() - start)
    size = len(batches[0])
    return {name: {"p50_ms": 1e3 * float(np.percentile(s, 50)), "p95_ms": 1e3 * float(np.percentile(s, 95)),
                   "img_per_s": size * len(s) / sum(s), "batches": len(s), "batch_size": size}
            for name, s in seconds.items()}


def speed(artifact: Path, out: Path, manifest, photos_1: int, batches_32: int, threads: int | None) -> dict:
    """Batch-1 and batch-32 latency of torch eager, onnxruntime fp32 and int8, side by side."""
    import torch

    from finegrain.runtime import runner

    test = manifest.rows("test")
    paths = [test.root / p for p in test.table["path"]]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(paths))
    pixels = [runner.decode(paths[i]) for i in order[:max(photos_1, 32 * batches_32 * 3)]]
    fp32, int8 = (runner.load_model(out / name, threads=threads) for name in ("model.onnx", "model.int8.onnx"))
    if threads:
        torch.set_num_threads(threads)
    engines = {"torch eager": TorchPredict(artifact), "onnxruntime fp32": lambda b: fp32.run(np.stack(b)),
               "onnxruntime int8": lambda b: int8.run(np.stack(b))}
    by_shape = defaultdict(list)
    for p in pixels:
        by_shape[p.shape].append(p)
    big = [group[i:i + 32] for group in by_shape.values() for i in range(0, len(group) - 31, 32)][:batches_32]
    return {"threads": {"torch": torch.get_num_threads(), "onnxruntime": threads or "default", "cpus": os.cpu_count(),
                        "load_average": os.getloadavg()},
            "batch_1": timings(engines, [[p] for p in pixels[:photos_1]], warmup=3),
            "batch_32": timings(engines, big, warmup=1) if big else None}


def install_sizes(runtime_venv: Path | None, wheels: Path | None) -> dict:
    """MB of the runner's wheels and fresh venv's site-packages, against this environment's site-packages."""

    def du(path: Path) -> float:
        return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0]) / 1e6

    def site(prefix: Path) -> Path:
        return next(prefix.glob("lib/python3*/site-packages"))

    result = {"full_env_site_packages_mb": du(site(Path(sys.prefix)))}
    if runtime_venv:
        result["runtime_venv_site_packages_mb"] = du(site(runtime_venv))
    if wheels:
        files = sorted(wheels.glob("*.whl"))
        result["runtime_wheels"] = {f.name: f.stat().st_size / 1e6 for f in files}
        result["runtime_wheels_mb"] = sum(result["runtime_wheels"].values())
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", type=Path, required=True, help="A supcon artifact trained on --manifest.")
    p.add_argument("--manifest", type=Path, default=MANIFEST)
    p.add_argument("--export-dir", type=Path, default=None, help="Default: ARTIFACT/../ARTIFACT_NAME-export.")
    p.add_argument("--photos-1", type=int, default=100, help="Photos timed at batch 1.")
    p.add_argument("--batches-32", type=int, default=6, help="Batches of 32 same-size photos timed.")
    p.add_argument("--runtime-venv", type=Path, default=None, help="A venv holding only the runner's packages.")
    p.add_argument("--wheels", type=Path, default=None, help="`pip download numpy Pillow onnxruntime -d DIR`.")
    p.add_argument("--threads", type=int, default=None, help="Threads for torch and onnxruntime (default: theirs).")
    p.add_argument("--per-channel", action="store_true", help="int8 with per-channel scales (export --per-channel).")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "export.json")
    args = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    from finegrain.data.manifest import Manifest

    out = args.export_dir or args.artifact.parent / f"{args.artifact.name}-export"
    manifest = Manifest.load(args.manifest)
    record = export(args.artifact, out, args.manifest, args.per_channel)
    result = {"command": " ".join(sys.argv), "artifact": str(args.artifact), "export_dir": str(out), "files": record["files"],
              "int8_check": record["int8"], "int8_size_ratio": record["files"]["model.int8.onnx"]["bytes"] / record["files"]["model.onnx"]["bytes"]}
    result["agreement"] = agreement(args.artifact, out, manifest)
    print(json.dumps(result["agreement"], indent=1), flush=True)
    result["speed"] = speed(args.artifact, out, manifest, args.photos_1, args.batches_32, args.threads)
    result["install"] = install_sizes(args.runtime_venv, args.wheels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, result)
    print_table(result)


def print_table(result: dict) -> None:
    a = result["agreement"]
    print(f"\n{a['photos']} test photos: fp32 top-1 = predict's on {100 * a['fp32_agrees_with_predict']:.2f}%, "
          f"int8 on {100 * a['int8_agrees_with_predict']:.2f}%; same unknown decision fp32 "
          f"{100 * a['fp32_same_unknown_decision']:.2f}%, int8 {100 * a['int8_same_unknown_decision']:.2f}%")
    print(f"top-1 accuracy: predict {100 * a['predict_top1']:.2f}%, fp32 {100 * a['fp32_top1']:.2f}%, "
          f"int8 {100 * a['int8_top1']:.2f}%; int8 file {result['int8_size_ratio']:.2f} x fp32's")
    print(f"{'engine':<18} {'batch':>5} {'p50 ms':>8} {'p95 ms':>8} {'img/s':>7}")
    for key in ("batch_1", "batch_32"):
        for name, t in (result["speed"][key] or {}).items():
            print(f"{name:<18} {t['batch_size']:>5} {t['p50_ms']:>8.1f} {t['p95_ms']:>8.1f} {t['img_per_s']:>7.1f}")
    print(json.dumps(result["install"], indent=1))


if __name__ == "__main__":
    main()
