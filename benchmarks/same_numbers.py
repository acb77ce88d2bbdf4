"""Same numbers through a code reshape: fingerprint what the CLI writes, then compare two fingerprints.

`run` drives one checkout's code through `python -m finegrain ...` only (PYTHONPATH=CHECKOUT; the
imported package is checked to come from it), at one thread, --workers 0, --device cpu, W&B off,
with FINEGRAIN_CACHE inside the result folder, on synthetic birds (demo-data 6 species x 12 photos,
64 px, seed 0; `manifest split --val-fraction 0.2 --seed 0`, and a second split with
--label-fraction 0.5 for suggest):
  - pretrain simclr, moco, byol, simsiam (32 px, batch 8, 3 steps, kNN monitor on)
  - supcon supcon, triplet, contrastive, ce, supcon_ce (32 px, batch 8 = 4 classes x 2, 4 steps from built-in
    weights, the backbone training after a 2-step head warm-up); supcon (default loss) --from the simclr
    artifact; --loss supcon --temperature 0.2 and --loss triplet --margin 0.3 (option routing)
  - evaluate, audit, suggest (--budget 3, on the label-fraction split) and predict (the test photos)
    from the supcon_ce artifact
A run that fails is recorded (exit code, last stderr lines) and the next one goes on. Each run's
fingerprint: sha256 of every tensor of model.safetensors, artifact.json's metrics/classifier/open_set,
every metrics.jsonl line, report/metrics.json, audit.json, CSVs written and cached features (.npy, by
content: their file names are keys over the photos' mtimes), after relativising paths under the result
folder and dropping the wall-clock fields in VOLATILE. Also the demo photos, the split manifests, the
decoded-image cache (by content too), and `finegrain --help` wall time (reported, not compared).

Usage:
  python benchmarks/same_numbers.py run --code /tmp/base_numbers --out /tmp/same_numbers/base1
  python benchmarks/same_numbers.py compare A/fingerprint.json B/fingerprint.json   # exit 1 if anything differs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

# Keys (in metrics.jsonl lines, report/metrics.json, audit.json) and CSV columns that hold wall-clock times:
# train/img_per_s and evaluate's context time_{knn,linear,retrieval,extraction}_s differed between two runs of the
# same code; audit.json's seconds is a wall-clock time too (rounded to 0.1 s, so equal on runs this small).
VOLATILE = re.compile(r"^(train/img_per_s|time_\w+_s|seconds)$")
DEVICE = ["--workers", "0", "--device", "cpu"]
TRAIN = [*DEVICE, "--wandb", "disabled", "--image-size", "32", "--batch-size", "8"]
PRETRAIN = [*TRAIN, "--max-steps", "3", "--knn-monitor"]
# 42 train photos / batch 8 = 5 steps an epoch: a 0.5-epoch head warm-up (2 steps, backbone frozen), then 2 steps
# that train the backbone too (with the default 1-epoch warm-up, 4 steps would never reach the backbone)
SUPCON = [*TRAIN, "--classes-per-batch", "4", "--max-steps", "4", "--head-warmup-epochs", "0.5"]
M, HALF, BEST = "data/split.csv", "data/split_half.csv", "runs/supcon_supcon_ce"


def plan(test_photos: list[str]) -> list[tuple[str, list[str], str]]:
    """(name, CLI arguments, output folder) of every run, in order (later runs read earlier artifacts)."""
    runs = [(f"pretrain_{m}", ["pretrain", "--manifest", M, "--method", m, *PRETRAIN])
            for m in ("simclr", "moco", "byol", "simsiam")]
    runs += [(f"supcon_{loss}", ["supcon", "--manifest", M, "--loss", loss, *SUPCON])
             for loss in ("supcon", "triplet", "contrastive", "ce", "supcon_ce")]
    runs += [("supcon_from_simclr", ["supcon", "--manifest", M, "--from", "runs/pretrain_simclr", *SUPCON]),
             ("supcon_temperature_0.2", ["supcon", "--manifest", M, "--loss", "supcon", "--temperature", "0.2",
                                         *SUPCON]),
             ("triplet_margin_0.3", ["supcon", "--manifest", M, "--loss", "triplet", "--margin", "0.3", *SUPCON])]
    out = [(name, [*args, "-o", f"runs/{name}"], f"runs/{name}") for name, args in runs]
    out += [("evaluate", ["evaluate", "--manifest", M, "--from", BEST, "--image-size", "32", *DEVICE,
                          "--wandb", "disabled", "-o", "runs/evaluate"], "runs/evaluate"),
            ("audit", ["audit", BEST, "--manifest", M, *DEVICE, "--wandb", "disabled", "-o", "runs/audit"],
             "runs/audit"),
            ("suggest", ["suggest", "--manifest", HALF, "--from", BEST, "--budget", "3", *DEVICE,
                         "--wandb", "disabled", "-o", "runs/suggest/suggest.csv"], "runs/suggest"),
            ("predict", ["predict", BEST, *test_photos, *DEVICE, "-o", "runs/predict/preds.csv"], "runs/predict")]
    return out


def environment(code: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code), FINEGRAIN_CACHE=str(out / "cache"), NO_ALBUMENTATIONS_UPDATE="1",
               WANDB_MODE="disabled", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTHONSTARTUP", None)
    return env


def cli(args: list[str], env: dict, out: Path, log_name: str) -> dict:
    """Run `python -m finegrain ARGS` in OUT; the log goes to OUT/logs. Returns exit code, stderr tail, seconds."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "finegrain", *args], cwd=out, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (out / "logs" / f"{log_name}.log").write_text(f"$ finegrain {' '.join(args)}\n{proc.stdout}\n{proc.stderr}")
    tail = proc.stderr.strip().splitlines()[-15:] if proc.returncode else []
    return {"exit_code": proc.returncode, "stderr_tail": tail, "seconds": round(seconds, 2)}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_hashes(path: Path) -> dict:
    """{key: sha256 of dtype, shape and raw bytes} of a .safetensors file, read by its format (any dtype)."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8:8 + size]), raw[8 + size:]
    header.pop("__metadata__", None)
    return {key: sha(f"{t['dtype']}{t['shape']}".encode() + body[t["data_offsets"][0]:t["data_offsets"][1]])
            for key, t in sorted(header.items())}


def clean(value, root: str):
    """Floats as repr, paths under the result folder relative, wall-clock keys dropped (recursively)."""
    if isinstance(value, dict):
        return {k: clean(v, root) for k, v in value.items() if not VOLATILE.match(k)}
    if isinstance(value, list):
        return [clean(v, root) for v in value]
    if isinstance(value, float):
        return repr(value)
    return value.replace(root, "") if isinstance(value, str) else value


def csv_hash(path: Path, root: str) -> dict:
    """sha256 of a CSV's text with paths under the result folder made relative; columns still holding absolute
    paths, and wall-clock columns, dropped (named in the result)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table = table.apply(lambda col: col.str.replace(root, "", regex=False))
    dropped = [c for c in table.columns if VOLATILE.match(c) or table[c].str.startswith("/").any()]
    text = table.drop(columns=dropped).to_csv(index=False, lineterminator="\n")
    return {"sha256": sha(text.encode()), "rows": len(table), "dropped_columns": dropped}


def array_hash(path: Path) -> str:
    array = np.load(path)
    return sha(f"{array.dtype}{array.shape}".encode() + np.ascontiguousarray(array).tobytes())


def fingerprint_dir(folder: Path, root: str) -> dict:
    """Everything numeric a run wrote to its folder."""
    found = {}
    if (folder / "model.safetensors").exists():
        found["tensors"] = tensor_hashes(folder / "model.safetensors")
    if (folder / "artifact.json").exists():
        artifact = json.loads((folder / "artifact.json").read_text())
        found["artifact"] = clean({k: artifact.get(k) for k in ("metrics", "classifier", "open_set")}, root)
    if (folder / "metrics.jsonl").exists():
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        found["metrics_jsonl"] = [clean(json.loads(line), root) for line in lines if line.strip()]
    for name in ("report/metrics.json", "audit.json"):
        if (folder / name).exists():
            found[name] = clean(json.loads((folder / name).read_text()), root)
    found["csv"] = {str(p.relative_to(folder)): csv_hash(p, root) for p in sorted(folder.rglob("*.csv"))}
    found["features"] = by_content(folder.rglob("*.npy"), array_hash)
    return found


def by_content(files, digest) -> dict:
    """{name prefix (e.g. the split): sorted content hashes} of cache files whose names end in a key: the keys hold
    the photos' root and mtimes, so they differ between two result folders while the contents agree."""
    found = {}
    for path in files:
        found.setdefault(path.stem.rsplit("-", 1)[0] if "-" in path.stem else "", []).append(digest(path))
    return {prefix: sorted(hashes) for prefix, hashes in sorted(found.items())}


def prepare_data(env: dict, out: Path) -> tuple[dict, list[str]]:
    """Demo birds and the two splits; their fingerprint and the test photos' paths (relative to OUT)."""
    steps = {"demo_data": ["demo-data", "data/birds", "--classes", "6", "--per-class", "12", "--image-size", "64",
                           "--seed", "0"],
             "split": ["manifest", "split", "data/birds/manifest.csv", "--val-fraction", "0.2", "--seed", "0",
                       "-o", M],
             "split_half": ["manifest", "split", "data/birds/manifest.csv", "--val-fraction", "0.2",
                            "--label-fraction", "0.5", "--seed", "0", "-o", HALF]}
    result = {name: cli(args, env, out, name) for name, args in steps.items()}
    photos = sorted((out / "data/birds").rglob("*.jpg"))
    result["photos"] = {"count": len(photos),
                        "sha256": sha(b"".join(str(p.relative_to(out)).encode() + p.read_bytes() for p in photos))}
    test = []
    for name in ("split.csv", "split_half.csv"):
        if (out / "data" / name).exists():
            result[name] = csv_hash(out / "data" / name, str(out) + "/")
            sidecar = json.loads((out / "data" / f"{name}.json").read_text())
            result[f"{name}.json"] = {k: v for k, v in sidecar.items() if k != "root_absolute"}
    if (out / M).exists():
        table = pd.read_csv(out / M, dtype=str, keep_default_na=False)
        test = [f"data/birds/{p}" for p in table.loc[table["split"] == "test", "path"]]
    return result, test


def help_seconds(env: dict, out: Path) -> list[float]:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "finegrain", "--help"], cwd=out, env=env, capture_output=True)
        times.append(round(time.perf_counter() - start, 3))
    return times


def run(code: Path, out: Path) -> None:
    code, out = code.resolve(), out.resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True)
    env = environment(code, out)
    where = subprocess.run([sys.executable, "-c", "import finegrain; print(finegrain.__file__)"], cwd=out, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(code):
        sys.exit(f"PYTHONPATH={code} imports finegrain from {where}, not from the checkout")
    print(f"finegrain from {where}", flush=True)
    start = time.perf_counter()
    result = {"code": str(code), "finegrain_file": where, "help_seconds": help_seconds(env, out), "runs": {}}
    result["runs"]["data"], test_photos = prepare_data(env, out)
    for name, args, folder in plan(test_photos):
        record = cli(args, env, out, name)
        print(f"{name}: exit {record['exit_code']} in {record['seconds']:.1f} s", flush=True)
        if (out / folder).exists():
            record.update(fingerprint_dir(out / folder, str(out) + "/"))
        result["runs"][name] = record
    result["runs"]["image_cache"] = by_content((out / "cache").rglob("*.u8"), lambda p: sha(p.read_bytes()))
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    (out / "fingerprint.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out / 'fingerprint.json'} ({result['total_seconds']} s)")


NOT_COMPARED = {"seconds", "stderr_tail"}


def differences(a, b, where: str = "") -> list[str]:
    """Each differing item between two fingerprint values: keys missing/added, values changed, lines differing."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}[{k}]: only in A" for k in a if k not in b and k not in NOT_COMPARED]
        out += [f"{where}[{k}]: only in B" for k in b if k not in a and k not in NOT_COMPARED]
        for k in a:
            if k in b and k not in NOT_COMPARED:
                out += differences(a[k], b[k], f"{where}[{k}]")
        return out
    if isinstance(a, list) and isinstance(b, list) and where.endswith("[metrics_jsonl]"):
        out = [f"{where} line {i + 1}: A {json.dumps(x)}\n{' ' * 6}B {json.dumps(y)}"
               for i, (x, y) in enumerate(zip(a, b)) if x != y]
        return out + ([f"{where}: A has {len(a)} lines, B {len(b)}"] if len(a) != len(b) else [])
    return [] if a == b else [f"{where}: A {json.dumps(a)} != B {json.dumps(b)}"]


def compare(path_a: Path, path_b: Path, shown: int = 12) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (path_a, path_b))
    print(f"A: {a['code']}  ({a['total_seconds']} s; --help {min(a['help_seconds'])} s)")
    print(f"B: {b['code']}  ({b['total_seconds']} s; --help {min(b['help_seconds'])} s)")
    differ = 0
    for name in dict.fromkeys([*a["runs"], *b["runs"]]):
        if name not in a["runs"] or name not in b["runs"]:
            print(f"{name}: only in {'A' if name in a['runs'] else 'B'}")
            differ += 1
            continue
        found = differences(a["runs"][name], b["runs"][name])
        differ += bool(found)
        print(f"{name}: {'identical' if not found else f'{len(found)} differences'}")
        for line in found[:shown]:
            print(f"    {line}")
        if len(found) > shown:
            print(f"    ... and {len(found) - shown} more")
        for side, runs in (("A", a["runs"]), ("B", b["runs"])):
            failed = runs[name].get("exit_code")
            if failed:
                print(f"    {side} failed (exit {failed}):", *runs[name]["stderr_tail"], sep="\n      ")
    print("all identical" if not differ else f"{differ} runs differ")
    return 1 if differ else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="fingerprint one checkout's CLI runs")
    p_run.add_argument("--code", type=Path, required=True, help="checkout whose finegrain/ is run")
    p_run.add_argument("--out", type=Path, required=True, help="result folder (replaced)")
    p_cmp = sub.add_parser("compare", help="compare two fingerprint.json files")
    p_cmp.add_argument("a", type=Path)
    p_cmp.add_argument("b", type=Path)
    p_cmp.add_argument("--shown", type=int, default=12, help="differences printed per run")
    args = parser.parse_args()
    if args.command == "run":
        run(args.code, args.out)
    else:
        sys.exit(compare(args.a, args.b, args.shown))


if __name__ == "__main__":
    main()
