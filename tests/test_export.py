"""`finegrain export` and the torch-free runner on a supcon artifact trained on synthetic birds: the exported model
names every test photo as `finegrain predict` does, runs with torch unimportable, and refuses bad input in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.config import PretrainConfig, SupconConfig
from finegrain.data import commands as dc
from finegrain.data.manifest import Manifest
from finegrain.data.synthetic import make_demo_dataset
from finegrain.runtime import runner
from finegrain.stages.predict import UNKNOWN, run_predict

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "albumentations", "cv2", "pandas", "finegrain")  # what the copied predict.py must not need
# Runs a script or module with HEAVY (or the names in argv[1]) unimportable, then checks none was loaded.
BLOCKED = """
import runpy, sys
blocked = tuple(sys.argv[1].split(","))
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
target, sys.argv = sys.argv[2], sys.argv[2:]
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
finally:
    assert not [m for m in sys.modules if m.split(".")[0] in blocked and sys.modules[m] is not None]
"""


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _blocked(blocked, *args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", BLOCKED, ",".join(blocked), *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Synthetic birds (4 species x 10, 64 px, with a val split) and a supcon artifact trained on them for one
    epoch: a classifier with flip averaging and an open-set calibration, as the demo's."""
    from finegrain.stages.supcon import run_supcon

    root = tmp_path_factory.mktemp("export_birds")
    make_demo_dataset(root / "birds", classes=4, per_class=10, image_size=64, seed=5)
    manifest = root / "birds" / "split.csv"
    dc.run_manifest_split(dc.ManifestSplitConfig(manifest=root / "birds" / "manifest.csv", val_fraction=0.25,
                                                 out=manifest))
    art = run_supcon(SupconConfig(manifest=str(manifest), out=str(root / "supcon"), backbone="test_efficientnet",
                                  weights="none", image_size=32, batch_size=8, classes_per_batch=4, epochs=1, workers=0,
                                  wandb="disabled", cache_images=False, knn_monitor=False, proj_dim=32, proj_hidden=64))
    assert art.info["classifier"]["flip_tta"] and art.info.get("open_set")
    return {"root": root, "manifest": Manifest.load(manifest), "manifest_file": manifest, "artifact": art}


@pytest.fixture(scope="module")
def exported(demo):
    """`finegrain export` of the demo artifact, with int8 calibrated on its train photos."""
    out = demo["root"] / "export"
    r = _cli("export", demo["artifact"].path, "-o", out, "--int8", "--calibration-manifest", demo["manifest_file"])
    assert r.exit_code == 0, r.output
    return out


def _test_photos(demo) -> list[Path]:
    m = demo["manifest"]
    return [m.root / p for p in m.table.loc[m.table["split"] == "test", "path"]]


def test_the_folder_holds_what_a_device_needs(demo, exported):
    assert {p.name for p in exported.iterdir()} >= {"model.onnx", "model.int8.onnx", "predict.py", "requirements.txt",
                                                     "README.md", "export.json"}
    assert (exported / "predict.py").read_text() == Path(runner.__file__).read_text()
    assert {line.split(">")[0].lower() for line in (exported / "requirements.txt").read_text().split()} == {
        "numpy", "pillow", "onnxruntime"}
    art = demo["artifact"]
    model = runner.load_model(exported)
    meta = model.meta
    assert model.classes == art.info["class_names"]
    assert meta["artifact_hash"] == art.hash and meta["finegrain_version"]
    assert float(meta["threshold"]) == pytest.approx(art.info["open_set"]["threshold"])
    assert int(meta["image_size"]) == art.info["classifier"]["image_size"]
    record = json.loads((exported / "export.json").read_text())
    assert record["parent"]["hash"] == art.hash and record["stage"] == "export"
    assert "python predict.py" in (exported / "README.md").read_text()


def test_the_runner_names_every_test_photo_as_predict_does(demo, exported, tmp_path):
    photos = _test_photos(demo)
    want = run_predict(demo["artifact"].path, photos, top_k=3, workers=0)
    rows, cols = runner.predict(runner.load_model(exported), photos, top_k=3)
    got = pd.DataFrame(rows)[cols]
    assert list(got.columns) == list(want.columns)
    assert (got["path"] == want["path"]).all() and len(got) == len(photos)
    assert (got["nearest_species"] == want["nearest_species"]).all()
    assert (got["pred_1"] == want["pred_1"]).all() and (got["known"] == want["known"]).all()
    scores = [f"score_{j}" for j in (1, 2, 3)]
    assert np.abs(got[scores].to_numpy(float) - want[scores].to_numpy(float)).max() <= 1e-4
    # `finegrain predict --model` writes the same CSV
    r = _cli("predict", "--model", exported / "model.onnx", *photos, "--top-k", "3", "-o", tmp_path / "p.csv")
    assert r.exit_code == 0, r.output
    via_cli = pd.read_csv(tmp_path / "p.csv")
    assert (via_cli["pred_1"] == want["pred_1"]).all() and list(via_cli.columns) == list(want.columns)


def test_unknown_species_are_named_unknown_as_predict_does(demo, exported):
    """A photo of a species the model never saw (drawn for this test) gets the same open-set answer both ways."""
    from finegrain.data.synthetic import ALL_SPECIES, render_bird, sample_nuisance

    seen = set(demo["manifest"].class_names)
    folder = demo["root"] / "unseen"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i, species in enumerate(s for s in ALL_SPECIES[:12] if s.name not in seen):
        render_bird(species, sample_nuisance(rng), 64).save(folder / f"{i}.jpg")
    want = run_predict(demo["artifact"].path, [folder], workers=0)
    rows, cols = runner.predict(runner.load_model(exported), runner.collect_photos([folder]))
    got = pd.DataFrame(rows)[cols]
    assert (got["known"] == want["known"]).all() and (got["pred_1"] == want["pred_1"]).all()
    scale = max(1.0, abs(demo["artifact"].info["open_set"]["threshold"]))  # the export stores its terms in float32
    np.testing.assert_allclose(got["unknown_score"].to_numpy(float), want["unknown_score"].to_numpy(float),
                               atol=1e-3 * scale)
    assert set(got["pred_1"]) <= set(demo["artifact"].info["class_names"]) | {UNKNOWN}


def test_the_preprocessing_graph_reads_pixels_as_predicts_view(demo):
    """Any photo size, up or down: the graph's input to the network equals albumentations' eval view exactly."""
    import onnxruntime as ort

    from finegrain.data.views import build_view
    from finegrain.export.onnx_model import reading_of
    from finegrain.export.preprocess import INPUT, preprocess_graph
    from finegrain.stages.predict import reading

    recipe, _ = reading(demo["artifact"].info)
    view, r = build_view(recipe), reading_of(demo["artifact"])
    graph = preprocess_graph(image_size=r.image_size, resize=r.resize, mean=r.mean, std=r.std, opset=18, ir_version=10)
    session = ort.InferenceSession(graph.SerializeToString())
    rng = np.random.default_rng(0)
    for h, w in [(64, 64), (41, 41), (37, 300), (333, 500), (500, 375), (12, 9), (97, 53)]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_allclose(session.run(None, {INPUT: pixels[None]})[0][0], view(pixels).numpy(), atol=1e-5,
                                   err_msg=f"{h}x{w}")


def test_predict_py_runs_with_torch_and_finegrain_unimportable(demo, exported, tmp_path):
    photos = _test_photos(demo)[:4]
    done = _blocked(HEAVY, exported / "predict.py", exported, *photos, "-o", tmp_path / "p.csv", "--top-k", "2",
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows, cols = runner.predict(runner.load_model(exported), photos, top_k=2)
    written = pd.read_csv(tmp_path / "p.csv")
    assert list(written.columns) == cols and list(written["pred_1"]) == [r["pred_1"] for r in rows]
    # python -m finegrain.runtime: finegrain may load, torch may not
    done = _blocked(("torch", "timm", "albumentations", "cv2"), "finegrain.runtime", exported, *photos, "--top-k", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == ",".join(cols) and len(done.stdout.splitlines()) == len(photos) + 1


def test_an_undecodable_photo_is_skipped_with_a_warning_naming_it(demo, exported, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    good = _test_photos(demo)[:2]
    done = _blocked(HEAVY, exported / "predict.py", exported, good[0], broken, good[1], "-o", tmp_path / "p.csv")
    assert done.returncode == 0, done.stderr
    assert "warning" in done.stderr and str(broken) in done.stderr
    written = pd.read_csv(tmp_path / "p.csv")
    assert len(written) == 3 and written["error"].notna().tolist() == [False, True, False]
    assert pd.isna(written["pred_1"][1]) and written["pred_1"][[0, 2]].notna().all()
    only_broken = _blocked(HEAVY, exported / "predict.py", exported, broken)
    assert only_broken.returncode == 2 and only_broken.stderr.strip().count("\n") == 1  # the warning, the error
    assert only_broken.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage", "empty"])
def test_a_missing_or_damaged_model_is_one_line_and_exit_2(demo, exported, tmp_path, damage):
    folder = tmp_path / "copy"
    folder.mkdir()
    data = (exported / "model.onnx").read_bytes()
    if damage != "missing":
        (folder / "model.onnx").write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096),
                                             "empty": b""}[damage])
    photo = _test_photos(demo)[0]
    done = _blocked(HEAVY, exported / "predict.py", folder, photo)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith("error: ") and "model.onnx" in done.stderr and "Traceback" not in done.stderr
    r = _cli("predict", "--model", folder / "model.onnx", photo)
    assert r.exit_code == 2 and r.output.startswith("error: ") and r.output.strip().count("\n") == 0, r.output


def test_export_refuses_an_artifact_without_a_classifier(demo, tmp_path):
    from finegrain.stages.pretrain import run_pretrain

    pre = run_pretrain(PretrainConfig(
        manifest=str(demo["manifest_file"]), out=str(tmp_path / "pre"), backbone="test_efficientnet",
        weights="none", image_size=32, batch_size=8, max_steps=1, workers=0, wandb="disabled", cache_images=False,
        knn_monitor=False, proj_dim=16))
    r = _cli("export", pre.path, "-o", tmp_path / "export")
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0, r.output
    assert "no classifier" in r.output and str(pre.path) in r.output
    assert not (tmp_path / "export" / "model.onnx").exists()
    r = _cli("export", tmp_path / "nowhere", "-o", tmp_path / "export")
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0, r.output


def test_int8_is_smaller_and_runs_with_the_same_columns(demo, exported):
    check = json.loads((exported / "export.json").read_text())["int8"]
    assert check["int8_bytes"] < check["fp32_bytes"] and 0 <= check["top1_agreement"] <= 1
    assert check["split"] == "val" and check["photos"] == len(demo["manifest"].rows("val"))
    photos = _test_photos(demo)
    rows, cols = runner.predict(runner.load_model(exported / "model.int8.onnx"), photos)
    assert len(rows) == len(photos) and all(not r["error"] for r in rows)
    assert all(0 <= r["score_1"] <= 1 for r in rows)


def test_wandb_logs_the_export_and_runs_shows_it_under_its_parent(demo, tmp_path):
    from finegrain.pipeline import list_runs, runs_tree

    out = demo["root"] / "runs_export"
    r = _cli("export", demo["artifact"].path, "-o", out, "--wandb", "offline")
    assert r.exit_code == 0, r.output
    assert list((out / "tracking" / "wandb").glob("offline-run-*"))
    record = json.loads((out / "export.json").read_text())
    assert record["wandb_run_id"] and record["parent"]["path"] == str(demo["artifact"].path.resolve())
    roots = runs_tree(list_runs(demo["root"]))
    supcon = next(n for n in roots if n["stage"] == "supcon")
    assert any(c["stage"] == "export" and Path(c["path"]) == out for c in supcon["children"])
    r = _cli("runs", demo["root"])
    assert r.exit_code == 0 and "export" in r.output
