"""Configs are checked when they are built: types, ranges, registry names and options a method does not use,
from Python, the CLI and pipeline files alike, before any file is read."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.config import ConfigError, EvaluateConfig, PretrainConfig, SupconConfig, config_from_dict
from finegrain.errors import FinegrainError
from finegrain.pipeline import load_pipeline, run_pipeline


def _pipeline(tmp_path, text: str):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


PIPELINE = """
data: {manifest: nowhere/manifest.csv}
defaults: {image_size: 32}
stages:
  pretrain: {method: simclr, epochs: 1}
  supcon: {lr: 1e-3, epochs: 1, batch_size: 8, classes_per_batch: 4}
"""


def _configs(spec) -> dict:
    from finegrain.pipeline import _stage_config

    return {name: _stage_config(name, spec, tmp_manifest, None) for name, tmp_manifest in
            ((n, "m.csv") for n in spec["stages"])}


def test_yaml_1e_3_reaches_the_config_as_a_float(tmp_path):
    spec = load_pipeline(_pipeline(tmp_path, PIPELINE))
    assert yaml.safe_load("lr: 1e-3")["lr"] == "1e-3"  # what PyYAML gives: a string
    lr = _configs(spec)["supcon"].lr
    assert isinstance(lr, float) and lr == pytest.approx(1e-3)


def test_set_override_reaches_the_config_as_a_float(tmp_path):
    spec = load_pipeline(_pipeline(tmp_path, PIPELINE), ["supcon.lr=2e-4", "pretrain.epochs=3"])
    configs = _configs(spec)
    assert isinstance(configs["supcon"].lr, float) and configs["supcon"].lr == pytest.approx(2e-4)
    assert configs["pretrain"].epochs == 3 and isinstance(configs["pretrain"].epochs, int)


@pytest.mark.parametrize("override,key", [
    ("supcon.epochs=five", "stages.supcon.epochs"),
    ("supcon.lr=fast", "stages.supcon.lr"),
    ("pretrain.freeze_bn=maybe", "stages.pretrain.freeze_bn"),
    ("supcon.backbone=3", "stages.supcon.backbone"),
    ("supcon.temperature=0", "stages.supcon.temperature"),
    ("supcon.loss=arcface", "stages.supcon.loss"),
    ("supcon.sampler=weighted", "stages.supcon.sampler"),
    ("pretrain.views=cutmix", "stages.pretrain.views"),
])
def test_a_bad_value_stops_at_load_naming_the_key(tmp_path, override, key):
    """The pipeline's manifest does not exist: the error must be the value's, found before any data work."""
    with pytest.raises(FinegrainError, match=key.replace(".", r"\.")):
        load_pipeline(_pipeline(tmp_path, PIPELINE), [override])


def test_a_typo_under_defaults_is_refused(tmp_path):
    text = PIPELINE.replace("defaults: {image_size: 32}", "defaults: {image_size: 32, imge_size: 64}")
    with pytest.raises(FinegrainError, match="unknown option.*defaults: imge_size"):
        load_pipeline(_pipeline(tmp_path, text))


def test_a_bad_stage_value_stops_before_earlier_stages_run(tmp_path):
    """A wrong supcon value must stop the run before the data step and pretrain, not after them."""
    calls = []
    text = PIPELINE.replace("supcon: {lr: 1e-3", "supcon: {lr: -1")
    with pytest.raises(FinegrainError, match="stages.supcon.lr: must be greater than 0"):
        run_pipeline(load_pipeline(_pipeline(tmp_path, text)), runner={"pretrain": calls.append})
    assert calls == []


def test_quoted_numbers_are_converted_and_odd_ones_refused():
    cfg = config_from_dict(PretrainConfig, {"epochs": "5", "lr": "0.01", "freeze_bn": "false", "wandb_tags": "a"})
    assert (cfg.epochs, cfg.lr, cfg.freeze_bn, cfg.wandb_tags) == (5, 0.01, False, ["a"])
    for values, key in (({"epochs": 2.5}, "epochs"), ({"epochs": True}, "epochs"), ({"lr": "nan"}, "lr"),
                        ({"wandb_tags": [1]}, "wandb_tags"), ({"seed": None}, "seed")):
        with pytest.raises(ConfigError, match=f"^{key}: "):
            config_from_dict(PretrainConfig, values)


@pytest.mark.parametrize("cls,values", [
    (PretrainConfig, {"temperature": 0}), (PretrainConfig, {"temperature": -0.1}),
    (SupconConfig, {"temperature": 0.0}), (SupconConfig, {"temperature": -1}),
    (PretrainConfig, {"batch_size": 0}), (PretrainConfig, {"moco_momentum": 1.5, "method": "moco"}),
    (SupconConfig, {"label_smoothing": 1.0, "loss": "ce"}), (SupconConfig, {"batch_size": 60}),
    (EvaluateConfig, {"knn_k": 0}), (EvaluateConfig, {"retrieval_split": "unlabeled"}),
    (PretrainConfig, {"device": "tpu"}), (PretrainConfig, {"amp": "fp8"}),
])
def test_values_out_of_range_are_refused_in_python(cls, values):
    with pytest.raises(ConfigError, match=f"^({'|'.join(values)}): "):
        cls(**values)


@pytest.mark.parametrize("stage,args", [
    ("pretrain", ["--temperature", "0"]),
    ("pretrain", ["--temperature", "-0.5"]),
    ("supcon", ["--temperature", "0"]),
])
def test_zero_or_negative_temperature_is_refused_before_any_file_is_read(tmp_path, stage, args):
    missing = tmp_path / "no-such-manifest.csv"
    r = CliRunner().invoke(app, [stage, "--manifest", str(missing), "-o", str(tmp_path / "out"), *args])
    assert r.exit_code == 2, r.output
    assert "--temperature: must be greater than 0" in r.output and "no-such-manifest" not in r.output
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,option,value", [
    ("byol", "--queue-size", "1024"), ("simsiam", "--temperature", "0.2"),
    ("byol", "--hard-negative-beta", "1.0"), ("simclr", "--moco-momentum", "0.9"),
])
def test_a_method_refuses_options_it_does_not_use(tmp_path, method, option, value):
    r = CliRunner().invoke(app, ["pretrain", "--manifest", str(tmp_path / "m.csv"), "-o", str(tmp_path / "out"),
                                 "--method", method, option, value])
    assert r.exit_code == 2, r.output
    assert f"{option}: --method {method} does not use this option" in r.output
    assert "Traceback" not in r.output


def test_a_loss_refuses_options_it_does_not_use():
    with pytest.raises(ConfigError, match="^margin: --loss ce does not use"):
        SupconConfig(loss="ce", margin=0.5)
    SupconConfig(loss="triplet", margin=0.5)  # the loss that reads it


def test_help_lists_every_registered_choice():
    from finegrain.registry import PRETRAIN_METHODS, SUPCON_LOSSES

    runner = CliRunner()
    pretrain = " ".join(runner.invoke(app, ["pretrain", "--help"], terminal_width=400).output.split())
    supcon = " ".join(runner.invoke(app, ["supcon", "--help"], terminal_width=400).output.split())
    assert all(name in pretrain for name in PRETRAIN_METHODS.names())
    assert all(name in supcon for name in SUPCON_LOSSES.names())
    assert "SimCLR, MoCo v2)" not in pretrain


def test_every_field_has_help_text():
    for cls in (PretrainConfig, SupconConfig, EvaluateConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
