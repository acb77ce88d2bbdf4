"""Every command is declared one way: its options are the fields of a config dataclass, checked when it is built,
and a bad value is one line naming the flag the user typed (exit code 2), before any file is read or written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.config import (BackbonesConfig, CommandConfig, ConfigError, ExportConfig, PredictConfig, RunConfig,
                              RunsConfig, config_from_dict)
from finegrain.data import commands as dc
from finegrain.errors import FinegrainError
from finegrain.review.config import ReviewConfig
from finegrain.stages import STAGES


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _leaf_commands(command, path=()):
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _leaf_commands(sub, (*path, name))
    else:
        yield " ".join(path), command


def test_every_command_is_declared_from_a_config():
    commands = dict(_leaf_commands(typer.main.get_command(app)))
    assert len(commands) == 21
    for name, command in commands.items():
        config_cls = getattr(command.callback, "config_cls", None)
        assert config_cls is not None and issubclass(config_cls, CommandConfig), name
        assert {p.name for p in command.params} == {f.name for f in dataclasses.fields(config_cls)}, name
    for stage in ("pretrain", "supcon", "evaluate", "audit", "suggest"):  # the stage table gives the stages' configs
        assert getattr(commands[stage].callback, "config_cls") is STAGES[stage].config


# The smallest valid options of each command's config (the fields without a default).
MINIMAL = {
    dc.ManifestCubConfig: {"root": "CUB_200_2011", "out": "m.csv"},
    dc.ManifestFolderConfig: {"root": "birds", "out": "m.csv"},
    dc.ManifestCsvConfig: {"file": "photos.csv", "out": "m.csv"},
    dc.ManifestSplitConfig: {"manifest": "m.csv"},
    dc.ManifestRelabelConfig: {"manifest": "m.csv", "source": "audit.csv", "out": "fixed.csv"},
    dc.ManifestShardConfig: {"manifest": "m.csv", "out": "shards"},
    dc.ManifestValidateConfig: {"manifest": "m.csv"},
    dc.DemoDataConfig: {"out_dir": "demo"},
    PredictConfig: {"artifact": "runs/supcon", "images": ["a.jpg"]},
    ExportConfig: {"artifact": "runs/supcon", "out": "export"},
    RunConfig: {"pipeline": "p.yaml"},
    RunsConfig: {},
    BackbonesConfig: {},
    ReviewConfig: {"manifest": "m.csv", "out": "review"},
    dc.ManifestImportLabelsConfig: {"manifest": "m.csv", "export": "export.json", "out": "new.csv"},
}


@pytest.mark.parametrize("config_cls", list(MINIMAL), ids=lambda c: c.__name__)
def test_config_from_a_dict_converts_paths_and_refuses_unknown_keys(config_cls):
    config = config_from_dict(config_cls, MINIMAL[config_cls])
    for key, value in MINIMAL[config_cls].items():
        assert getattr(config, key) == (Path(value) if isinstance(value, str) else [Path(v) for v in value])
    with pytest.raises(FinegrainError, match="unknown option.*colour"):
        config_from_dict(config_cls, {**MINIMAL[config_cls], "colour": "red"})


def test_predict_config_open_set_is_on_or_off():
    base = MINIMAL[PredictConfig]
    assert PredictConfig(**base).open_set_scoring is None
    assert PredictConfig(**base, open_set="on").open_set_scoring is True
    assert PredictConfig(**base, open_set="off").open_set_scoring is False
    with pytest.raises(ConfigError, match="open_set: must be on or off, got 'maybe'"):
        PredictConfig(**base, open_set="maybe")
    with pytest.raises(ConfigError, match="images"):
        PredictConfig(artifact="runs/supcon", images=[])


def test_split_config_val_fraction_default_depends_on_label_fraction():
    assert dc.ManifestSplitConfig(manifest="m.csv").val_fraction == 0.1
    assert dc.ManifestSplitConfig(manifest="m.csv", label_fraction="0.2").val_fraction == 0.0
    assert dc.ManifestSplitConfig(manifest="m.csv", val_fraction=0.3, label_fraction=0.2).val_fraction == 0.3
    with pytest.raises(ConfigError, match="test_fraction: val_fraction \\+ test_fraction must be below 1"):
        dc.ManifestSplitConfig(manifest="m.csv", val_fraction=0.5, test_fraction=0.5)


def test_csv_config_reads_four_box_columns():
    config = dc.ManifestCsvConfig(file="t.csv", out="m.csv", bbox_cols="x, y,w ,h")
    assert config.bbox_columns == ("x", "y", "w", "h")
    assert dc.ManifestCsvConfig(file="t.csv", out="m.csv").bbox_columns is None
    with pytest.raises(ConfigError, match="bbox_cols: needs four column names"):
        dc.ManifestCsvConfig(file="t.csv", out="m.csv", bbox_cols="x,y,w")


def test_demo_species_count_matches_the_drawings():
    from finegrain.data.synthetic import ALL_SPECIES

    assert dc.DEMO_SPECIES == len(ALL_SPECIES)


@pytest.mark.parametrize("args,flag", [
    (["manifest", "split", "{m}", "--val-fraction", "1.5"], "--val-fraction"),
    (["manifest", "split", "{m}", "--val-fraction", "0.6", "--test-fraction", "0.4"], "--test-fraction"),
    (["manifest", "split", "{m}", "--label-fraction", "0"], "--label-fraction"),
    (["manifest", "csv", "{m}", "--bbox-cols", "a,b", "-o", "{tmp}/c.csv"], "--bbox-cols"),
    (["manifest", "shard", "{m}", "-o", "{tmp}/shards", "--max-side", "4"], "--max-side"),
    (["manifest", "shard", "{m}", "-o", "{tmp}/shards", "--workers", "0"], "--workers"),
    (["demo-data", "{tmp}/demo", "--per-class", "1"], "--per-class"),
    (["demo-data", "{tmp}/demo", "--test-fraction", "2"], "--test-fraction"),
    (["predict", "{tmp}", "{m}", "--open-set", "maybe"], "--open-set"),
    (["predict", "{tmp}", "{m}", "--top-k", "0"], "--top-k"),
    (["predict", "{tmp}", "{m}", "--device", "gpu"], "--device"),
    (["predict", "--model", "{tmp}/model.onnx", "{m}", "--flip-tta"], "--flip-tta"),
    (["export", "{tmp}", "-o", "{tmp}/export", "--int8"], "--calibration-manifest"),
    (["export", "{tmp}", "-o", "{tmp}/export", "--format", "tflite"], "--format"),
])
def test_bad_option_is_one_line_naming_the_flag_and_changes_nothing(tmp_path, args, flag):
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_id,path,label,split\na,a.jpg,wren,train\n")
    r = _invoke(*[a.format(tmp=tmp_path, m=manifest) for a in args])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [r.output.strip()] and r.output.startswith(f"error: {flag}: "), r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]  # nothing written, the manifest not overwritten
    assert manifest.read_text() == "image_id,path,label,split\na,a.jpg,wren,train\n"


def test_manifest_commands_run_from_their_configs(birds, tmp_path):
    config = dc.ManifestSplitConfig(manifest=birds.root / "manifest.csv", label_fraction=0.5, out=tmp_path / "s.csv")
    said = dc.run_manifest_split(config)
    assert said.startswith(f"wrote {tmp_path / 's.csv'}: ") and "unlabeled" in said
    manifest, report = dc.run_manifest_validate(dc.ManifestValidateConfig(manifest=tmp_path / "s.csv"))
    assert report.ok and len(manifest) == len(birds)
