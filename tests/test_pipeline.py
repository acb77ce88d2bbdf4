"""`finegrain run`: stages chained by artifacts, cached when their inputs are unchanged, resumed after a crash."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.errors import FinegrainError
from finegrain.pipeline import STAGES, list_runs, load_pipeline, run_pipeline, runs_tree, stage_key

from conftest import Crash, crash_after_step

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, birds, **stages) -> Path:
    spec = {
        "name": "t",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"manifest": str(birds.root / "manifest.csv")},
        "defaults": {"backbone": "test_efficientnet", "weights": "none", "image_size": 32, "workers": 0,
                     "wandb": "disabled", "cache_dir": str(tmp_path / "cache"), "knn_monitor": False},
        "stages": stages or {
            "pretrain": {"batch_size": 8, "epochs": 1, "proj_dim": 16},
            "supcon": {"batch_size": 8, "classes_per_batch": 4, "epochs": 1, "proj_dim": 16},
            "evaluate": {"embedding_map": False},
        },
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _counting_runner(calls):
    from finegrain.stages.evaluate import run_evaluate
    from finegrain.stages.pretrain import run_pretrain
    from finegrain.stages.supcon import run_supcon

    real = {"pretrain": run_pretrain, "supcon": run_supcon, "evaluate": run_evaluate}

    def wrap(name):
        def run(cfg):
            calls.append(name)
            return real[name](cfg)
        return run

    return {name: wrap(name) for name in real}


def test_second_run_is_cached_and_a_supcon_change_reruns_supcon_and_evaluate(birds, tmp_path):
    path = _write(tmp_path, birds)
    calls: list[str] = []
    first = run_pipeline(load_pipeline(path), runner=_counting_runner(calls))
    assert calls == ["pretrain", "supcon", "evaluate"] and [r.status for r in first] == ["ran"] * 3
    # each stage consumed the previous artifact
    assert first[1].info["parent"]["hash"] == first[0].info["artifact_hash"]
    assert first[2].info["parent"]["hash"] == first[1].info["artifact_hash"]

    calls.clear()
    second = run_pipeline(load_pipeline(path), runner=_counting_runner(calls))
    assert calls == [] and [r.status for r in second] == ["cached"] * 3
    assert [r.path for r in second] == [r.path for r in first]

    calls.clear()
    third = run_pipeline(load_pipeline(path, ["supcon.temperature=0.2"]), runner=_counting_runner(calls))
    assert calls == ["supcon", "evaluate"]
    assert third[0].path == first[0].path and third[1].path != first[1].path and third[2].path != first[2].path
    assert third[1].info["parent"]["hash"] == first[0].info["artifact_hash"]

    calls.clear()
    run_pipeline(load_pipeline(path), force=["evaluate"], runner=_counting_runner(calls))
    assert calls == ["evaluate"]
    listed = list_runs(tmp_path / "runs")
    assert sorted(r["stage"] for r in listed) == ["evaluate", "evaluate", "pretrain", "supcon", "supcon"]
    (root,) = runs_tree(listed)  # one pretrain, two supcons from it, an evaluation under each
    assert root["stage"] == "pretrain" and [c["stage"] for c in root["children"]] == ["supcon", "supcon"]
    assert all([g["stage"] for g in c["children"]] == ["evaluate"] for c in root["children"])
    summary = json.loads((tmp_path / "runs" / "pipeline.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["pretrain", "supcon", "evaluate"]


def test_an_interrupted_stage_resumes_on_the_next_run(birds, tmp_path, monkeypatch):
    from finegrain.methods import SupervisedMethod

    path = _write(tmp_path, birds, supcon={"batch_size": 8, "classes_per_batch": 4, "epochs": 2, "checkpoint_every": 2,
                                           "classifier": False})
    crash_after_step(monkeypatch, SupervisedMethod, 3)
    with pytest.raises(Crash):
        run_pipeline(load_pipeline(path))
    monkeypatch.undo()
    (result,) = run_pipeline(load_pipeline(path))
    assert result.status == "resumed" and result.info["metrics"]["steps"] == 6


def test_bad_pipeline_files_are_clear_errors(birds, tmp_path):
    path = _write(tmp_path, birds)
    with pytest.raises(FinegrainError, match="unknown option"):
        run_pipeline(load_pipeline(path, ["supcon.no_such_option=1"]))
    with pytest.raises(FinegrainError, match="unknown stage"):
        load_pipeline(path, ["stages.finetune.epochs=1"])
    with pytest.raises(FinegrainError, match="next must be a list"):
        load_pipeline(path, ["next=run this"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [pretrain\n")
    with pytest.raises(FinegrainError, match="not valid YAML"):
        load_pipeline(bad)
    bad.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(FinegrainError):
        load_pipeline(bad)  # the safe loader refuses to build Python objects


def test_cli_run_and_runs(birds, tmp_path):
    path = _write(tmp_path, birds, evaluate={"embedding_map": False})
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "next": ["finegrain manifest folder ~/photos -o mine.csv"]}))
    r = CliRunner().invoke(app, ["run", str(path)])
    assert r.exit_code == 0, r.output
    assert "index.html" in r.output and "Compared with" in r.output and "chance" in r.output
    assert "Next, on your own photos" in r.output and "finegrain manifest folder ~/photos -o mine.csv" in r.output
    r = CliRunner().invoke(app, ["run", str(path)])
    assert r.exit_code == 0 and "cached" in r.output
    r = CliRunner().invoke(app, ["runs", str(tmp_path / "runs")])
    assert r.exit_code == 0 and "evaluate" in r.output
    r = CliRunner().invoke(app, ["runs", str(tmp_path / "runs"), "--json"])
    assert r.exit_code == 0, r.output
    (root,) = json.loads(r.output)  # the bare backbone's evaluation: a root without children
    assert root["stage"] == "evaluate" and root["children"] == [] and root["metrics"]["knn_top1"] >= 0


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "pipelines").glob("*.yaml")))
def test_shipped_pipelines_parse_into_stage_configs(name):
    from finegrain.pipeline import STAGES, _stage_config

    spec = load_pipeline(REPO / "pipelines" / name)
    for stage in spec["stages"]:
        cfg = _stage_config(stage, spec, Path("m.csv"), None)
        assert isinstance(cfg, STAGES[stage])


def test_a_distill_stage_learns_from_the_supcon_artifact_on_the_unlabelled_photos(birds, tmp_path):
    from finegrain.data.split import keep_label_fraction

    keep_label_fraction(birds, 0.5).save(birds.root / "few.csv")
    path = _write(tmp_path, birds,
                  supcon={"batch_size": 8, "classes_per_batch": 4, "epochs": 1, "proj_dim": 16},
                  distill={"batch_size": 8, "classes_per_batch": 4, "epochs": 1, "proj_dim": 16,
                           "unlabeled_batch_size": 4},
                  evaluate={"embedding_map": False})
    spec = yaml.safe_load(path.read_text())
    spec["data"]["manifest"] = str(birds.root / "few.csv")
    path.write_text(yaml.safe_dump(spec))
    results = run_pipeline(load_pipeline(path))
    assert [r.stage for r in results] == ["supcon", "distill", "evaluate"]
    supcon, distill, evaluate = results
    assert distill.info["teacher"] == str(supcon.path) and distill.info["unlabeled"] == "teacher"
    assert distill.info["parent"] is None  # the student starts from the backbone weights, not from its teacher
    assert evaluate.info["parent"]["path"] == str(distill.path.resolve())


@pytest.mark.parametrize("field, value", [("keep_checkpoint", True), ("knn_monitor_share", 1.0)])
def test_options_about_disk_and_monitoring_do_not_change_a_stages_cache_key(field, value):
    for name in ("pretrain", "supcon"):
        cfg = STAGES[name]()
        assert stage_key(name, cfg, "m", None) == stage_key(name, dataclasses.replace(cfg, **{field: value}), "m", None)
