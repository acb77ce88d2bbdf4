"""Every command's help reads as paragraphs at any terminal width, lists only options the command reads, and says
what predict's unknown_score is as the artifact records it."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import re

import pytest
import typer.main
from typer.testing import CliRunner

from finegrain.cli import app


def _leaf_commands(command, path=()):
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _leaf_commands(sub, (*path, name))
    else:
        yield path, command


COMMANDS = dict(_leaf_commands(typer.main.get_command(app)))


def _description(output: str) -> list[str]:
    """The rendered lines between the usage block and the first panel (arguments, options)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("Usage:"))
    while lines[start].strip():  # the usage block may wrap over several lines
        start += 1
    end = next(i for i, line in enumerate(lines) if line.lstrip().startswith("╭"))
    return [line.rstrip() for line in lines[start:end]]


def _line_starts(doc: str) -> list[str]:
    """Where the docstring means a line to begin: each paragraph's first line and each indented (example) line."""
    starts = []
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = paragraph.splitlines()
        starts += [lines[0].strip()] + [line.strip() for line in lines[1:] if re.match(r"\s+\S", line)]
    return [s for s in starts if s]


@pytest.mark.parametrize("columns", [60, 200])
@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_help_reads_as_paragraphs_at_any_width(path, columns):
    """A rendered description line either begins a paragraph (or an example line) of the docstring, or continues
    the line above because its first word did not fit there: no line is cut short inside a sentence."""
    r = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(columns)})
    assert r.exit_code == 0, r.output
    assert max(len(line) for line in r.output.splitlines()) <= columns
    doc = COMMANDS[path].callback.__doc__
    starts = _line_starts(doc)
    lines = _description(r.output)
    for above, line in zip(lines, lines[1:]):
        text = line.strip()
        if not text or not above.strip() or any(s.startswith(text[:40]) for s in starts):
            continue
        first_word = text.split()[0]
        gap = re.search(re.escape(above.split()[-1]) + r"([ \t]*)" + re.escape(first_word), doc)  # spaces written
        assert len(above) + max(1, len(gap.group(1)) if gap else 1) + len(first_word) > columns - 1, (
            f"{' '.join(path)} --help at {columns} columns breaks a line early:\n{above}\n{line}")


# --- every option a command's help lists is read by the command -------------------------------------------

class _Reads:
    """Records the fields of `config_cls` instances that code reads once the config is built: not its own checks
    (__post_init__), not copying or dumping it (dataclasses.asdict/replace, to_dict)."""

    SKIP = {"__post_init__", "to_dict"}

    def __init__(self, monkeypatch, config_cls):
        self.names, self.seen = {f.name for f in dataclasses.fields(config_cls)}, set()
        plain = object.__getattribute__
        reads = self

        def getattribute(obj, name):
            if name in reads.names and reads._counts(sys._getframe(1)):
                reads.seen.add(name)
            return plain(obj, name)

        monkeypatch.setattr(config_cls, "__getattribute__", getattribute)

    @classmethod
    def _counts(cls, frame) -> bool:
        if frame.f_code.co_filename in (dataclasses.__file__,) or frame.f_code.co_filename.startswith("<"):
            return False
        while frame is not None:
            if frame.f_code.co_name in cls.SKIP:
                return False
            frame = frame.f_back
        return True


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The synthetic birds (a quarter of the train photos unlabelled) and a tiny supcon artifact on them."""
    from finegrain.data.split import keep_label_fraction
    from finegrain.data.synthetic import make_demo_dataset

    root = tmp_path_factory.mktemp("reads")
    full = make_demo_dataset(root / "data", classes=4, per_class=8, image_size=48, seed=3)
    keep_label_fraction(full, 0.75, seed=0).save(root / "data" / "few.csv")
    r = CliRunner().invoke(app, ["supcon", "--manifest", str(root / "data" / "few.csv"), "-o", str(root / "sup"),
                                 *TINY, "--cache-dir", str(root / "cache")])
    assert r.exit_code == 0, r.output
    return root


TINY = ["--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32", "--batch-size", "8",
        "--classes-per-batch", "4", "--max-steps", "1", "--workers", "0", "--wandb", "disabled", "--no-knn-monitor",
        "--proj-dim", "16"]

SUPCON_ONLY = ("--classes-per-batch", "4")
# The kNN monitor on, over more than two epochs (its pacing, --knn-monitor-share, judges the readings between the
# first and the last).
MONITORED = [{"1": "12"}.get(a, a) if i == TINY.index("--max-steps") + 1 else a
             for i, a in enumerate(TINY) if a != "--no-knn-monitor"]
FEATURES = ["--workers", "0", "--cache-dir", "{root}/cache", "--features-dir", "{root}/features"]
# Each command's runs: together they take every branch that reads an option (e.g. --teacher's own options).
RUNS = {
    "pretrain": [["--manifest", "{root}/data/few.csv", "-o", "{out}/p", *[a for a in MONITORED if a not in SUPCON_ONLY],
                  "--cache-dir", "{root}/cache"]],
    "supcon": [["--manifest", "{root}/data/few.csv", "-o", "{out}/t", *TINY, "--teacher", "{root}/sup"],
               ["--manifest", "{root}/data/few.csv", "-o", "{out}/u", *TINY, "--unlabeled", "pseudo"],
               ["--manifest", "{root}/data/few.csv", "-o", "{out}/f", *MONITORED, "--from", "{root}/sup"]],
    "audit": [["{root}/sup", "--manifest", "{root}/data/few.csv", "-o", "{out}/a", "--wandb", "disabled", *FEATURES]],
    "evaluate": [["--manifest", "{root}/data/few.csv", "-o", "{out}/e", "--backbone", "test_efficientnet", "--weights",
                  "none", "--image-size", "32", "--wandb", "disabled", *FEATURES],
                 ["--manifest", "{root}/data/few.csv", "-o", "{out}/e2", "--from", "{root}/sup", "--wandb", "disabled",
                  "--audit", "{out}/a", *FEATURES]],
    "suggest": [["--manifest", "{root}/data/few.csv", "-o", "{out}/s.csv", "--from", "{root}/sup", "--budget", "2",
                 *FEATURES],
                ["--manifest", "{root}/data/few.csv", "-o", "{out}/s2.csv", "--backbone", "test_efficientnet",
                 "--weights", "none", "--image-size", "32", "--budget", "2", *FEATURES]],
    "predict": [["{root}/sup", "{root}/data/images", "-o", "{out}/preds.csv", "--workers", "0"]],
    # its own caches: features read from a cache do not read the extraction options
    "pseudo-label": [["--manifest", "{root}/data/few.csv", "-o", "{out}/pl", "--backbone", "test_efficientnet",
                      "--weights", "none", "--image-size", "32", "--wandb", "disabled", "--workers", "0",
                      "--cache-dir", "{out}/plcache", "--features-dir", "{out}/plfeatures"],
                     ["--manifest", "{root}/data/few.csv", "-o", "{out}/pl2", "--from", "{root}/sup", "--wandb",
                      "disabled", *FEATURES]],
}


# Options read only where these runs cannot go, and where they are.
ONLY_WHEN = {"sync_bn": "torchrun with several CUDA processes (engine/loop.py)"}


@pytest.mark.slow
def test_every_option_a_stage_lists_is_read(trained, tmp_path, monkeypatch):
    """Run each command that works on photos (runs above); every option its help lists must have been read, except
    a method's own options (the config refuses one the chosen method does not read, tests/test_config.py)."""
    from finegrain.config import method_option_names

    unread = {}
    for name, runs in RUNS.items():
        config_cls = COMMANDS[(name,)].callback.config_cls
        reads = _Reads(monkeypatch, config_cls)
        for args in runs:
            r = CliRunner().invoke(app, [name, *(a.format(root=trained, out=tmp_path) for a in args)])
            assert r.exit_code == 0, (name, r.output)
        monkeypatch.undo()
        missing = reads.names - reads.seen - set(method_option_names(config_cls)) - set(ONLY_WHEN)
        if missing:
            unread[name] = sorted(missing)
    assert not unread, f"options listed in help that the command never read: {unread}"


def test_predict_help_names_the_score_a_supcon_artifact_records(trained):
    """The unknown_score predict documents as the default is the one a supcon artifact made with defaults records;
    every score an artifact may record is described."""
    from finegrain.artifacts import load_artifact
    from finegrain.config import OPEN_SET_SCORES

    recorded = load_artifact(trained / "sup").info["open_set"]["score"]
    r = CliRunner().invoke(app, ["predict", "--help"], env={"COLUMNS": "200"})
    text = " ".join(r.output.split())
    assert re.search(rf"{recorded} \([^)]*\)[^;]*, the default", text), text
    assert all(f"{name} (" in text for name in OPEN_SET_SCORES)
    assert "0-2" not in text  # knn_distance's range, not the default score's


def test_every_option_of_the_data_commands_is_read(tmp_path, monkeypatch):
    """The same check for the quick commands: each run once with every option given (manifest cub, shard, relabel
    and run are left to their own tests: they need CUB's layout, litdata shards, an audit, a pipeline)."""
    d = tmp_path
    runs = {
        ("demo-data",): [str(d / "demo"), "--classes", "2", "--per-class", "4", "--image-size", "32",
                         "--test-fraction", "0.25", "--seed", "1"],
        ("manifest", "folder"): [str(d / "demo" / "images"), "-o", str(d / "folder.csv")],
        ("manifest", "csv"): [str(d / "demo" / "photos.csv"), "--path-col", "path", "--label-col", "label",
                              "--split-col", "split", "--id-col", "image_id", "--bbox-cols", "bbox_x,bbox_y,bbox_w,bbox_h",
                              "--root", str(d / "demo"), "-o", str(d / "csv.csv")],
        ("manifest", "split"): [str(d / "csv.csv"), "-o", str(d / "split.csv"), "--val-fraction", "0.25",
                                "--test-fraction", "0", "--label-fraction", "0.5", "--seed", "1"],
        ("manifest", "validate"): [str(d / "split.csv"), "--root", str(d / "demo"), "--allow-unseen-classes",
                                   "--show-classes"],
        ("runs",): [str(d), "--json"],
        ("backbones",): [],
    }
    unread = {}
    for path, args in runs.items():
        if path == ("manifest", "csv"):  # the demo's table with boxes (the whole photo)
            import pandas as pd

            table = pd.read_csv(d / "demo" / "manifest.csv")
            table.assign(bbox_x=0, bbox_y=0, bbox_w=32, bbox_h=32).to_csv(d / "demo" / "photos.csv", index=False)
        reads = _Reads(monkeypatch, COMMANDS[path].callback.config_cls)
        r = CliRunner().invoke(app, [*path, *args])
        assert r.exit_code == 0, (path, r.output)
        monkeypatch.undo()
        if reads.names - reads.seen:
            unread[" ".join(path)] = sorted(reads.names - reads.seen)
    assert not unread, f"options listed in help that the command never read: {unread}"
