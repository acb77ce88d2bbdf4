"""Label Studio interop: `suggest` and `audit` write import tasks (Label Studio's documented JSON, finegrain's
guesses as pre-annotations) and a labeling config; `manifest import-labels` reads a JSON export back into a new
manifest. No Label Studio server: the export is built from the tasks the way Label Studio stores annotations."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET

import pandas as pd
import pytest
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.config import SupconConfig
from finegrain.data import label_studio as ls
from finegrain.data.manifest import Manifest
from finegrain.data.split import keep_label_fraction
from finegrain.data.synthetic import make_demo_dataset
from finegrain.stages.supcon import run_supcon


def test_tasks_and_config_follow_label_studio_formats_and_escape_names(tmp_path):
    evil = '<script>"a" & b</script>'
    t = ls.task("img/a.jpg", tmp_path / "img" / "a.jpg", evil, 0.75, rank=1, reason="")
    assert t["data"]["finegrain_path"] == "img/a.jpg" and "reason" not in t["data"]
    assert t["data"]["image"].startswith("/data/local-files/?d=") and "%20" not in t["data"]["image"]
    assert t["predictions"] == [{"model_version": "finegrain", "score": 0.75, "result": [
        {"from_name": "species", "to_name": "image", "type": "choices", "value": {"choices": [evil]}}]}]
    assert "predictions" not in ls.task("b.jpg", tmp_path / "b.jpg", "")
    tasks, config = ls.write_tasks(tmp_path / "tasks.json", [t], ["Wren", evil])
    view = ET.fromstring(config.read_text())  # well-formed XML whatever the names
    assert [c.get("value") for c in view.iter("Choice")] == ["Wren", evil, ls.EXCLUDE]
    assert view.find("Image").get("value") == "$image" and view.find("Choices").get("toName") == "image"
    assert json.loads(tasks.read_text()) == [t]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Synthetic birds with half the train labels gone, a 1-epoch supcon artifact, and the tasks suggest and audit
    write for Label Studio."""
    root = tmp_path_factory.mktemp("label_studio")
    full = make_demo_dataset(root / "data", classes=4, per_class=8, image_size=64, seed=3)
    keep_label_fraction(full, 0.5, seed=0).save(root / "few.csv")
    run_supcon(SupconConfig(manifest=str(root / "few.csv"), out=str(root / "sup"), backbone="test_efficientnet",
                            weights="none", image_size=32, batch_size=8, classes_per_batch=4, epochs=1, workers=0,
                            wandb="disabled", cache_dir=str(root / "cache"), knn_monitor=False, proj_dim=16))
    common = ["--workers", "0", "--cache-dir", str(root / "cache"), "--device", "cpu"]
    runner = CliRunner()
    res = runner.invoke(app, ["suggest", "--manifest", str(root / "few.csv"), "--from", str(root / "sup"), "-o",
                              str(root / "next.csv"), "--budget", "6", "--label-studio", str(root / "suggest.json"),
                              *common])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["audit", str(root / "sup"), "--manifest", str(root / "few.csv"), "-o",
                              str(root / "audit"), "--label-studio", str(root / "audit.json"), "--wandb", "disabled",
                              *common])
    assert res.exit_code == 0, res.output
    return root


@pytest.mark.slow
def test_suggest_and_audit_write_tasks_with_their_guesses(tasks):
    root = tasks
    picks = pd.read_csv(root / "next.csv", keep_default_na=False)
    written = json.loads((root / "suggest.json").read_text())
    assert [t["data"]["finegrain_path"] for t in written] == list(picks["path"])
    manifest = Manifest.load(root / "few.csv")
    for t, guess in zip(written, picks["best_guess"]):
        assert t["predictions"][0]["result"][0]["value"]["choices"] == [guess]
        assert ls._local_path(t["data"]["image"]) == str(manifest.abspath(t["data"]["finegrain_path"]).resolve())
    assert (root / "suggest.label_config.xml").is_file()
    findings = pd.read_csv(root / "audit" / "audit.csv", keep_default_na=False)
    written = json.loads((root / "audit.json").read_text())
    assert [t["data"]["finegrain_path"] for t in written] == list(findings["path"])
    for t, (issue, suggested) in zip(written, zip(findings["issue"], findings["suggested_label"])):
        assert t["predictions"][0]["result"][0]["value"]["choices"] == [suggested if issue == "label" else ls.EXCLUDE]


def _annotated(task, choice, cancelled=False, at="2026-12-01T10:00:00Z"):
    """The task as Label Studio exports it once someone chose `choice`."""
    done = copy.deepcopy(task)
    result = copy.deepcopy(task["predictions"][0]["result"]) if "predictions" in task else [
        {"from_name": "species", "to_name": "image", "type": "choices", "value": {"choices": [None]}}]
    result[0]["value"]["choices"] = [choice]
    done["annotations"] = done.get("annotations", []) + [{"id": len(done.get("annotations", [])) + 1, "result": result,
                                                          "was_cancelled": cancelled, "updated_at": at}]
    return done


@pytest.mark.slow
def test_a_label_studio_export_becomes_a_new_manifest(tasks, tmp_path):
    root = tasks
    written = json.loads((root / "suggest.json").read_text())
    manifest = Manifest.load(root / "few.csv")
    species = manifest.class_names
    export = [
        _annotated(written[0], species[0]),                                    # a species
        _annotated(_annotated(written[1], species[0], at="2026-12-01T09:00:00Z"), species[1]),  # changed: latest wins
        _annotated(written[2], ls.EXCLUDE),                                    # left out
        _annotated(written[3], species[2], cancelled=True),                    # skipped in Label Studio
        written[4],                                                            # not labelled yet
    ]
    export[0]["data"].pop("finegrain_path")  # found by its local-files URL too
    (tmp_path / "export.json").write_text(json.dumps(export))
    out = tmp_path / "labelled.csv"
    res = CliRunner().invoke(app, ["manifest", "import-labels", str(root / "few.csv"), str(tmp_path / "export.json"),
                                   "-o", str(out)])
    assert res.exit_code == 0, res.output
    new = Manifest.load(out).table.set_index("path")
    paths = [t["data"]["finegrain_path"] for t in written]
    expected = {paths[0]: (species[0], "train", "reviewed"), paths[1]: (species[1], "train", "reviewed"),
                paths[3]: ("", "unlabeled", "given"), paths[4]: ("", "unlabeled", "given")}
    for path, label, split in zip(manifest.table["path"], manifest.table["label"], manifest.table["split"]):
        if path == paths[2]:
            assert path not in new.index
        else:
            assert tuple(new.loc[path, ["label", "split", "label_source"]]) == expected.get(path, (label, split,
                                                                                                 "given")), path
    provenance = json.loads(out.with_name("labelled.csv.json").read_text())["provenance"]
    assert provenance["relabelled_from"] == "label-studio" and provenance["labels"] == 3
    assert CliRunner().invoke(app, ["manifest", "validate", str(out)]).exit_code == 0


@pytest.mark.parametrize("content,message", [
    ("{not json", "cannot read a Label Studio JSON export"),
    ('{"data": {}}', "is a list of tasks"),
    ('[{"annotations": []}]', "task 0 has no 'data' object"),
    ('[{"data": {"finegrain_path": "elsewhere.jpg"}, "annotations": [{"result": [{"from_name": "species", '
     '"type": "choices", "value": {"choices": ["x"]}}]}]}]', "elsewhere.jpg is not a photo of the manifest"),
])
def test_a_bad_export_is_one_line(birds, tmp_path, content, message):
    (tmp_path / "export.json").write_text(content)
    res = CliRunner().invoke(app, ["manifest", "import-labels", str(birds.root / "manifest.csv"),
                                   str(tmp_path / "export.json"), "-o", str(tmp_path / "x.csv")])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
