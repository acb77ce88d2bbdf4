"""Every benchmark results file records the code it measured: `write_results` adds the commit and a dirty flag.

    from _results import write_results
    write_results(path, record)   # record + {"commit": git HEAD, "dirty": uncommitted changes to tracked files}

A reader (or tests/test_benchmarks_results.py) can then tell which code gave a number, and two files
that answer the same question can be checked against each other.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def code_version(repo: Path = REPO) -> dict:
    """{"commit": the checked-out commit (40 hex digits) or None outside git, "dirty": tracked files changed}."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def write_results(path, record: dict, *, resumed: bool = False) -> Path:
    """Write `record` plus the code version (commit, dirty) as indented JSON to `path`; returns the path.

    resumed: the record carries on results of earlier runs read from `path` (a benchmark that resumes):
    the commits those were measured at are kept under "earlier_commits".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    version = code_version()
    record = {k: v for k, v in record.items() if k not in ("commit", "dirty", "earlier_commits")}
    if resumed and path.is_file():
        old = json.loads(path.read_text())
        earlier = [c for c in [*old.get("earlier_commits", []), old.get("commit")] if c and c != version["commit"]]
        if earlier:
            record["earlier_commits"] = list(dict.fromkeys(earlier))
    path.write_text(json.dumps({**record, **version}, indent=2) + "\n")
    return path
