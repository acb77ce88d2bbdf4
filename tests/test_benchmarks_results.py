"""benchmarks/results/*.json: each records the commit it measured, and no two give different answers to one question.

A results file's "figures" are its named answers (e.g. "simclr_e2e_over_compute"); a figure that two files
carry (one copied from the other, or two runs of one question) must agree, so a reader never meets two answers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = sorted((REPO / "benchmarks" / "results").glob("*.json"))
sys.path.insert(0, str(REPO / "benchmarks"))

from _results import code_version, write_results  # noqa: E402


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_every_results_file_records_the_commit_it_measured(path):
    record = _load(path)
    assert re.fullmatch(r"[0-9a-f]{40}", record.get("commit") or ""), f"{path.name}: no commit"
    assert "dirty" in record, f"{path.name}: no dirty flag"


def test_no_two_results_files_answer_one_question_differently():
    answers: dict[str, dict[str, object]] = {}
    for path in RESULTS:
        for name, value in (_load(path).get("figures") or {}).items():
            answers.setdefault(name, {})[path.name] = value
    assert answers, "no results file names its figures"
    clashes = {name: files for name, files in answers.items() if len({json.dumps(v) for v in files.values()}) > 1}
    assert not clashes, clashes


def test_extraction_is_answered_in_one_file_only():
    """The throughput study no longer measures extraction; its old figure is kept only as retired."""
    for path in RESULTS:
        record = _load(path)
        if path.name != "extraction.json":
            assert "extraction" not in record, path.name
            assert not any(name.startswith("extraction") for name in record.get("figures") or {}), path.name


@pytest.mark.parametrize("script", sorted((REPO / "benchmarks").glob("bench_*.py")), ids=lambda p: p.name)
def test_every_benchmark_writes_its_results_through_write_results(script):
    source = script.read_text()
    assert not re.search(r"\.write_text\(json\.dumps", source), f"{script.name} writes JSON without its commit"
    if "results" in source:
        assert "write_results(" in source, script.name


def test_write_results_records_the_code_version(tmp_path):
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    path = write_results(tmp_path / "r.json", {"figures": {"x": 1}})
    record = _load(path)
    assert record["commit"] == head == code_version()["commit"] and isinstance(record["dirty"], bool)
    # a resumed benchmark keeps the commits its earlier results were measured at
    path.write_text(json.dumps({**record, "commit": "0" * 40}))
    write_results(path, {"figures": {"x": 1}}, resumed=True)
    again = _load(path)
    assert again["commit"] == head and again["earlier_commits"] == ["0" * 40]
