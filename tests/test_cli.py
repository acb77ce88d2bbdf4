"""The command line as a user meets it: real files in, files out, clear errors, exit codes."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.data.manifest import Manifest

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cub_import_and_validate(cub50, tmp_path):
    r = invoke("manifest", "cub", cub50, "-o", tmp_path / "m.parquet")
    assert r.exit_code == 0, r.output
    m = Manifest.load(tmp_path / "m.parquet")
    assert len(m) == 2952 and m.split_counts() == {"train": 1452, "test": 1500}
    r = invoke("manifest", "validate", tmp_path / "m.parquet")
    assert r.exit_code == 0, r.output
    assert "OK" in r.output and "50 classes" in r.output


def test_validate_fails_and_names_files(birds, tmp_path):
    bad = birds.table["path"][0]
    (birds.root / bad).write_bytes(b"\xff\xd8\xff garbage")
    gone = birds.table["path"][1]
    (birds.root / gone).unlink()
    r = invoke("manifest", "validate", birds.root / "manifest.csv", "--show-classes")
    assert r.exit_code == 1
    assert bad in r.output and gone in r.output and "FAILED" in r.output
    assert "Traceback" not in r.output


def test_demo_data_folder_csv_and_split(tmp_path):
    r = invoke("demo-data", tmp_path / "d", "--classes", 3, "--per-class", 6, "--image-size", 48)
    assert r.exit_code == 0, r.output
    demo = Manifest.load(tmp_path / "d" / "manifest.csv")
    assert len(demo) == 18

    r = invoke("manifest", "folder", tmp_path / "d" / "images", "-o", tmp_path / "f.csv")
    assert r.exit_code == 0, r.output
    assert len(Manifest.load(tmp_path / "f.csv")) == 18

    r = invoke("manifest", "split", tmp_path / "f.csv", "--val-fraction", 0.2, "--test-fraction", 0.2, "--seed", 1, "-o", tmp_path / "s.parquet")
    assert r.exit_code == 0, r.output
    assert Manifest.load(tmp_path / "s.parquet").split_counts() == {"train": 12, "val": 3, "test": 3}

    listing = demo.table.assign(file=demo.table["path"], species=demo.table["label"])[["file", "species"]]
    listing.to_csv(tmp_path / "d" / "mine.csv", index=False)
    r = invoke("manifest", "csv", tmp_path / "d" / "mine.csv", "--path-col", "file", "--label-col", "species", "-o", tmp_path / "c.csv")
    assert r.exit_code == 0, r.output
    assert invoke("manifest", "validate", tmp_path / "c.csv").exit_code == 0


@pytest.mark.parametrize("args,message", [
    (["manifest", "cub", "{tmp}/nowhere", "-o", "{tmp}/m.csv"], "not a folder"),
    (["manifest", "validate", "{tmp}/nothing.csv"], "not found"),
    (["manifest", "folder", "{tmp}", "-o", "{tmp}/m.txt"], "no sub-folders"),
    (["manifest", "csv", "{tmp}/l.csv", "--path-col", "nope", "-o", "{tmp}/m.csv"], "no column"),
    (["manifest", "csv", "{tmp}/l.csv", "--path-col", "p", "--bbox-cols", "a,b", "-o", "{tmp}/m.csv"], "four column"),
    (["demo-data", "{tmp}/d", "--classes", "500"], "between 2 and"),
])
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    pd.DataFrame({"p": ["a.jpg"]}).to_csv(tmp_path / "l.csv", index=False)
    r = invoke(*[a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 2
    assert "error:" in r.output and message in r.output
    assert "Traceback" not in r.output


def test_manifest_with_wrong_suffix_is_refused(birds, tmp_path):
    shutil.copytree(birds.root / "images", tmp_path / "imgs")
    r = invoke("manifest", "folder", tmp_path / "imgs", "-o", tmp_path / "m.txt")
    assert r.exit_code == 2 and ".csv or .parquet" in r.output


def test_help_shows_examples():
    for cmd in (["manifest", "cub"], ["manifest", "validate"], ["demo-data"]):
        r = invoke(*cmd, "--help")
        assert r.exit_code == 0 and "Example" in r.output
