"""Training throughput per stage against the compute bound, against lightly, and with speed options.

For each stage (pretrain SimCLR, pretrain MoCo, supcon) the script alternates, in one run:
  * end to end: the real stage (`run_pretrain` / `run_supcon`) on real JPEGs through the image cache,
    views, DataLoader workers and the engine; img/s read from the engine's own per-step timing;
  * compute: the very model the engine just trained (captured from `fit`), its optimizer step on one
    batch of views already in memory.
e2e_over_compute is the median over rounds of (end to end / compute): what data loading and
bookkeeping cost. For SimCLR it also times lightly 1.6 as its docs show it (SimCLRTransform,
torchvision ImageFolder, DataLoader, the same timm backbone with lightly's SimCLRProjectionHead and
NTXentLoss, same batch, resolution and optimiser): vs_lightly = our end to end / lightly's.
Speed options (channels_last, bf16 autocast, torch.compile) are timed on the in-memory SimCLR step.
Feature extraction is measured in one place only: `python benchmarks/bench_eval.py extraction`.

Uses ../shared/data/cub50 when present, else synthetic birds. Writes benchmarks/results/throughput.json.

`monitor` mode: the kNN monitor's share of a training stage's time, at the shipped pipelines' settings:
the demo's supcon (pipelines/demo.yaml) and the few-labels teacher and student (pipelines/few_labels.yaml,
on cub50; skipped without it). Each stage runs as `finegrain run` would run it, bounded (the shipped
monitor: a class-balanced sample, --knn-monitor-share 0.1) and, with --unbounded, also as before the
bound (every photo of the split at every epoch end). Writes benchmarks/results/monitor_share.json.

Usage: python benchmarks/bench_throughput.py [--image-size 128] [--batch-size 32] [--steps 12] [--rounds 2]
       python benchmarks/bench_throughput.py monitor [--unbounded teacher,demo] [--student-steps 100]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from finegrain.config import PretrainConfig, SupconConfig  # noqa: E402
from finegrain.data.synthetic import make_demo_dataset  # noqa: E402
from finegrain.engine.device import resolve_device  # noqa: E402
from finegrain.stages import skeleton  # noqa: E402
from finegrain.stages.pretrain import run_pretrain  # noqa: E402
from finegrain.stages.supcon import run_supcon  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _results import write_results  # noqa: E402
CUB50 = REPO.parent / "shared" / "data" / "cub50"
WARM = 3  # steps left out of every median (worker start-up, allocator warm-up)


def run_stage(stage: str, cfg, captured: dict) -> float:
    """Run the stage end to end; return its median img/s and leave the trained model in `captured`."""
    real_fit = skeleton.fit

    def spy(method, dataset, cfg_, out, **kw):
        result = real_fit(method, dataset, cfg_, out, **kw)
        captured.update(method=method, dataset=dataset, cfg=cfg_, kw=kw)
        return result

    skeleton.fit = spy
    try:
        (run_pretrain if stage != "supcon" else run_supcon)(cfg)
    finally:
        skeleton.fit = real_fit
    lines = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    # With log_every=1 the engine logs each step's img/s, timed from the previous step's end (loading included).
    return statistics.median(x["train/img_per_s"] for x in lines if "train/img_per_s" in x and x["step"] > WARM)


def one_batch(captured: dict, batch_size: int):
    """A real batch of views (list of (B, 3, S, S)) and labels (B,), as the engine's sampler would draw it."""
    dataset = captured["dataset"]
    sampler = captured["kw"].get("sampler")
    indices = list(itertools.islice(iter(sampler), batch_size)) if sampler is not None else range(batch_size)
    items = [dataset[i] for i in indices]
    views = [torch.stack([it[0][v] for it in items]) for v in range(len(items[0][0]))]
    return views, torch.tensor([it[1] for it in items])


def compute_rate(captured: dict, device, steps: int, *, channels_last=None, amp=None, compile=False) -> float:
    """img/s of forward + backward + optimizer step of the captured model on one in-memory batch.

    channels_last: memory format of weights and inputs; None = what the stage's config used.
    """
    import timm.optim

    cfg = captured["cfg"]
    method = copy.deepcopy(captured["method"]).to(device)
    views, labels = one_batch(captured, cfg.batch_size)
    views, labels = [v.to(device) for v in views], labels.to(device)
    fmt = torch.channels_last if (cfg.channels_last if channels_last is None else channels_last) else torch.contiguous_format
    method = method.to(memory_format=fmt)
    views = [v.contiguous(memory_format=fmt) for v in views]
    params = [p for p in method.parameters() if p.requires_grad]
    opt = timm.optim.create_optimizer_v2(params, opt=cfg.optimizer, lr=1e-4, weight_decay=cfg.weight_decay, momentum=0.9)
    step = torch.compile(method) if compile else method
    method.train()
    times = []
    for i in range(steps + WARM):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
            loss, _ = step(views, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_step(i + 1, steps + WARM)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return cfg.batch_size / statistics.median(times[WARM:])


def lightly_rate(images_dir: Path, simclr, args, device) -> float:
    """img/s of lightly's documented SimCLR training loop with our timm backbone, head sizes, temperature,
    batch, resolution and optimiser (`simclr`: the captured finegrain SimCLR module)."""
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    # lightly's documented loop: the model in PyTorch's default (contiguous) memory format. The captured
    # backbone carries the engine's channels_last layout, so it is converted back.
    backbone = copy.deepcopy(simclr.backbone).to(device, memory_format=torch.contiguous_format)
    head = SimCLRProjectionHead(simclr.head.in_dim, simclr.head.hidden_dim, simclr.head.out_dim).to(device)
    model = torch.nn.Sequential(backbone, head).train()
    criterion = NTXentLoss(temperature=simclr.temperature)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=PretrainConfig.weight_decay)
    dataset = torchvision.datasets.ImageFolder(str(images_dir), transform=SimCLRTransform(input_size=args.image_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, generator=torch.Generator().manual_seed(0))
    times, t0 = [], time.perf_counter()
    for (x0, x1), _ in loader:
        x0, x1 = x0.to(device), x1.to(device)
        loss = criterion(model(x0), model(x1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - t0)
        t0 = now
        if len(times) >= args.steps + WARM:
            break
    return args.batch_size / statistics.median(times[WARM:])


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per measurement (after 3 warm-up steps)")
    ap.add_argument("--rounds", type=int, default=2, help="end-to-end / compute pairs per stage")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--stages", default="simclr,moco,supcon")
    ap.add_argument("--no-options", action="store_true", help="skip the channels_last / bf16 / compile timings")
    ap.add_argument("--option-steps", type=int, default=5, help="timed steps per speed option")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "throughput.json")
    return ap.parse_args()


def prepare_data(tmp: Path) -> tuple[Path, Path, str]:
    """(manifest, images directory, description of the data): cub50 when present, else synthetic birds in `tmp`."""
    if (CUB50 / "images.txt").is_file():
        return REPO / "data_manifests" / "cub50.csv", CUB50 / "images", "cub50 (real JPEGs)"
    make_demo_dataset(tmp / "birds", classes=12, per_class=60, image_size=256)
    return tmp / "birds" / "manifest.csv", tmp / "birds" / "images", "synthetic birds 256px"


def stage_configs(args: argparse.Namespace, manifest: Path, tmp: Path) -> dict:
    """Per stage name, a function from a run's output directory to that stage's config."""
    common = dict(manifest=str(manifest), image_size=args.image_size, batch_size=args.batch_size, epochs=100,
                  max_steps=args.steps + WARM, workers=args.workers, wandb="disabled", knn_monitor=False,
                  cache_dir=str(tmp / "cache"), device=args.device, warmup_epochs=0.0, log_every=1)
    return {
        "simclr": lambda out: PretrainConfig(out=out, method="simclr", **common),
        "moco": lambda out: PretrainConfig(out=out, method="moco", queue_size=4096, **common),
        "supcon": lambda out: SupconConfig(out=out, head_warmup_epochs=0, classes_per_batch=args.batch_size // 4,
                                           **common),
    }


def measure_stage(stage: str, configs: dict, args: argparse.Namespace, device, tmp: Path) -> tuple[dict, dict]:
    """Alternate end-to-end and compute measurements of one stage for --rounds rounds.

    Returns the stage's summary (medians over rounds, then the rounds) and the last round's captured model.
    """
    rounds, captured = [], {}
    for r in range(args.rounds):
        captured = {}
        e2e = run_stage(stage, configs[stage](str(tmp / f"{stage}{r}")), captured)
        compute = compute_rate(captured, device, args.steps)
        rounds.append({"e2e_img_per_s": round(e2e, 2), "compute_img_per_s": round(compute, 2),
                       "ratio": round(e2e / compute, 3)})
        print(f"{stage} round {r}: end to end {e2e:.1f} img/s, compute {compute:.1f} img/s", flush=True)
    summary = {
        "e2e_img_per_s": round(statistics.median(x["e2e_img_per_s"] for x in rounds), 2),
        "compute_img_per_s": round(statistics.median(x["compute_img_per_s"] for x in rounds), 2),
        "e2e_over_compute": round(statistics.median(x["ratio"] for x in rounds), 3),
        "rounds": rounds,
    }
    return summary, captured


def compare_with_lightly(captured: dict, images_dir: Path, configs: dict, args: argparse.Namespace, device,
                         tmp: Path) -> dict:
    """Alternate lightly's SimCLR loop and our SimCLR stage end to end for --rounds rounds; return the medians."""
    ours, theirs = [], []
    for _ in range(args.rounds):
        theirs.append(lightly_rate(images_dir, captured["method"], args, device))
        ours.append(run_stage("simclr", configs["simclr"](str(tmp / f"vs{len(ours)}")), {}))
        print(f"simclr vs lightly: ours {ours[-1]:.1f} img/s, lightly {theirs[-1]:.1f} img/s", flush=True)
    return dict(
        lightly_img_per_s=round(statistics.median(theirs), 2), ours_img_per_s_same_rounds=round(statistics.median(ours), 2),
        vs_lightly=round(statistics.median(o / t for o, t in zip(ours, theirs)), 3))


def measure_stages(args: argparse.Namespace, configs: dict, images_dir: Path, device,
                   tmp: Path) -> tuple[dict, dict | None]:
    """Every stage of --stages (SimCLR also against lightly); returns the summaries and SimCLR's captured model."""
    stages, captured_simclr = {}, None
    for stage in args.stages.split(","):
        stages[stage], captured = measure_stage(stage, configs, args, device, tmp)
        if stage == "simclr":
            captured_simclr = captured
            stages["simclr"].update(compare_with_lightly(captured, images_dir, configs, args, device, tmp))
    return stages, captured_simclr


def measure_speed_options(captured_simclr: dict, device, steps: int) -> dict:
    """In-memory SimCLR step img/s with each speed option; an option that fails is reported with its error."""
    options = {}
    trials = {"contiguous": {"channels_last": False}, "channels_last": {"channels_last": True},
              "channels_last + bf16 autocast": {"channels_last": True, "amp": torch.bfloat16},
              "channels_last + torch.compile": {"channels_last": True, "compile": True}}
    for name, kw in trials.items():
        try:
            t0 = time.perf_counter()
            rate = compute_rate(captured_simclr, device, steps, **kw)
            options[name] = {"img_per_s": round(rate, 2), "wall_s": round(time.perf_counter() - t0, 1)}
        except Exception as e:  # noqa: BLE001 - an option that fails here is reported, not fatal
            options[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(f"option {name}: {options[name]}", flush=True)
    base = options["contiguous"].get("img_per_s")
    for v in options.values():
        if base and "img_per_s" in v:
            v["vs_contiguous"] = round(v["img_per_s"] / base, 3)
    return options


def build_result(args: argparse.Namespace, device, data: str, stages: dict, options: dict) -> dict:
    """The JSON record of the run; its "figures" are the answers other results files must not contradict."""
    figures = {f"{name}_e2e_over_compute": s["e2e_over_compute"] for name, s in stages.items()}
    if "vs_lightly" in stages.get("simclr", {}):
        figures["vs_lightly"] = stages["simclr"]["vs_lightly"]
    return {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "data": data, "backbone": "tf_efficientnet_lite0 (offline ImageNet)",
        "image_size": args.image_size, "batch_size": args.batch_size, "workers": args.workers, "steps": args.steps,
        "rounds": args.rounds, "stages": stages, "speed_options_simclr_step": options, "figures": figures,
        "command": "python benchmarks/bench_throughput.py " + " ".join(sys.argv[1:]),
    }


def write_and_print(result: dict, out: Path) -> None:
    """Write the JSON record to `out`, then print the per-stage table."""
    write_results(out, result)
    print(f"\n{'stage':8s} {'e2e img/s':>10s} {'compute':>10s} {'ratio':>7s} {'vs lightly':>11s}")
    for name, s in result["stages"].items():
        print(f"{name:8s} {s['e2e_img_per_s']:10.1f} {s['compute_img_per_s']:10.1f} {s['e2e_over_compute']:7.3f} "
              f"{s.get('vs_lightly', float('nan')):11.3f}")
    print(f"wrote {out}")


# ---------------------------------------------------------------------------------------------------------
# monitor mode
# ---------------------------------------------------------------------------------------------------------

# (pipeline file, stages to run, name of each in the results); the evaluate stages are left out.
MONITOR_RUNS = {"demo": ("demo.yaml", {"supcon": "demo_supcon"}),
                "few_labels": ("few_labels.yaml", {"supcon": "few_labels_teacher", "distill": "few_labels_student"})}


def timed_stages(spec: dict, names: dict, unbounded: bool) -> dict:
    """Run the pipeline `spec`; per stage (result name): its wall time and the fit's time, monitor time and readings.

    unbounded: the monitor as before its bound (every photo of the split, a reading at every epoch end).
    """
    from finegrain.eval import monitor as monitor_mod
    from finegrain.pipeline import run_pipeline
    from finegrain.stages import PIPELINE_STAGES

    fits, rows = [], {}
    real_fit = skeleton.fit

    def spy(*a, **kw):
        fits.append(real_fit(*a, **kw))
        return fits[-1]

    def timed(name):
        def run(cfg):
            if unbounded:
                cfg.knn_monitor_share = 1.0
            t0 = time.perf_counter()
            PIPELINE_STAGES[name].run(cfg)
            fit = fits[-1]
            rows[names[name]] = {"stage_s": round(time.perf_counter() - t0, 1), "fit_s": round(fit.seconds, 1),
                                 "monitor_s": round(fit.monitor_seconds, 1), "readings": fit.monitor_readings,
                                 "steps": fit.steps, "epochs": fit.epochs_done}
            rows[names[name]]["monitor_share_of_stage"] = round(fit.monitor_seconds / (time.perf_counter() - t0), 3)
            print(names[name], "unbounded" if unbounded else "bounded", json.dumps(rows[names[name]]), flush=True)
        return run

    limits = monitor_mod.MONITOR_GALLERY, monitor_mod.MONITOR_QUERIES
    skeleton.fit = spy
    if unbounded:
        monitor_mod.MONITOR_GALLERY = monitor_mod.MONITOR_QUERIES = 10**9
    try:
        run_pipeline(spec, runner={name: timed(name) for name in names})
    finally:
        skeleton.fit = real_fit
        monitor_mod.MONITOR_GALLERY, monitor_mod.MONITOR_QUERIES = limits
    return rows


def monitor_spec(run: str, tmp: Path, arm: str, student_steps: int) -> dict | None:
    """The shipped pipeline `run`, its data and runs under `tmp`, only the stages measured; None without its data."""
    from finegrain.pipeline import load_pipeline

    file, names = MONITOR_RUNS[run]
    sets = [f"runs_dir={tmp / run / arm}"]
    if run == "demo":
        sets.append(f"data.demo.out={tmp / 'demo_birds'}")
        sets.append(f"defaults.cache_dir={tmp / 'demo_cache'}")
    else:
        if not (CUB50 / "images.txt").is_file():
            return None
        copy_dir = tmp / "cub50_manifest"
        copy_dir.mkdir(exist_ok=True)
        for name in ("cub50.csv", "cub50.csv.json"):
            (copy_dir / name).write_bytes((REPO / "data_manifests" / name).read_bytes())
        sets += [f"data.manifest={copy_dir / 'cub50.csv'}", f"distill.max_steps={student_steps}"]
    spec = load_pipeline(REPO / "pipelines" / file, sets)
    spec["stages"] = {k: v for k, v in spec["stages"].items() if k in names}
    for stage in spec["stages"].values():
        stage.update(wandb="disabled")
    return spec


def monitor_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="the kNN monitor's share of a stage's time (see the module docstring)")
    ap.add_argument("--unbounded", default="demo,teacher", help="also measure these as before the bound: "
                    "comma-separated from demo, teacher, student (empty: none)")
    ap.add_argument("--student-steps", type=int, default=100, help="few-labels student steps (shipped: 100)")
    ap.add_argument("--runs", default="demo,few_labels")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "monitor_share.json")
    args = ap.parse_args(argv)
    unbounded = {x for x in args.unbounded.split(",") if x}
    results = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for run in args.runs.split(","):
            for arm in ("bounded", "unbounded"):
                names = MONITOR_RUNS[run][1]
                wanted = {k: v for k, v in names.items() if arm == "bounded" or v.rsplit("_", 1)[-1] in unbounded
                          or (v == "demo_supcon" and "demo" in unbounded)}
                spec = monitor_spec(run, tmp, arm, args.student_steps)
                if spec is None or not wanted:
                    continue
                last = max(list(names).index(k) for k in wanted)  # a later stage needs the ones before it
                spec["stages"] = dict(list(spec["stages"].items())[:last + 1])
                rows = timed_stages(spec, {k: names[k] for k in spec["stages"]}, unbounded=arm == "unbounded")
                for name, row in rows.items():
                    if name in wanted.values():
                        results.setdefault(name, {})[arm] = row
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
              "torch": torch.__version__, "student_steps": args.student_steps, "stages": results,
              "goal": "monitor_share_of_stage <= 0.1 (bounded)",
              "command": "python benchmarks/bench_throughput.py monitor " + " ".join(argv)}
    write_results(args.out, record)
    print(f"\n{'stage':22s} {'arm':10s} {'stage s':>8s} {'monitor s':>10s} {'readings':>9s} {'share':>6s}")
    for name, arms in results.items():
        for arm, r in arms.items():
            print(f"{name:22s} {arm:10s} {r['stage_s']:8.1f} {r['monitor_s']:10.1f} {r['readings']:9d} "
                  f"{r['monitor_share_of_stage']:6.3f}")
    print(f"wrote {args.out}")


def main() -> None:
    if sys.argv[1:2] == ["monitor"]:
        return monitor_main(sys.argv[2:])
    args = parse_args()
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        manifest, images_dir, data = prepare_data(tmp)
        configs = stage_configs(args, manifest, tmp)
        stages, captured_simclr = measure_stages(args, configs, images_dir, device, tmp)
        options = {}
        if captured_simclr is not None and not args.no_options:
            options = measure_speed_options(captured_simclr, device, args.option_steps)

    write_and_print(build_result(args, device, data, stages, options), args.out)


if __name__ == "__main__":
    main()
