"""Shared by the review tests: queue files in the formats `audit` and `suggest` write, and the server as a real
subprocess (so it can be SIGKILLed)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from finegrain.data.manifest import Manifest
from finegrain.data.split import keep_label_fraction
from finegrain.stages.audit import COLUMNS as AUDIT_COLUMNS

SUGGEST_COLUMNS = ["rank", "image_id", "path", "reason", "score", "represents", "best_guess", "best_guess_prob"]


def review_data(birds: Manifest, folder: Path, *, findings: dict[str, int], suggested: int) -> dict:
    """A manifest with half the train photos unlabelled, an audit folder with `findings` (issue -> count, over
    labelled train photos) and a suggest CSV of `suggested` unlabelled photos (every other one with a best guess).

    Returns paths (manifest, audit, suggest) and the tables (manifest, audit, suggest)."""
    folder.mkdir(parents=True, exist_ok=True)
    m = keep_label_fraction(birds, 0.5, seed=0)
    manifest = m.save(folder / "m.csv")
    table = m.table
    train = table[table["split"] == "train"].reset_index(drop=True)
    species = sorted(set(train["label"]))
    rows, n = [], 0
    for issue, count in findings.items():
        for _ in range(count):
            r = train.iloc[n % len(train)]
            other = train.iloc[(n + 1) % len(train)]
            n += 2 if issue == "duplicate" else 1
            suggestion = {"label": next(s for s in species if s != r["label"]), "duplicate": other["label"],
                          "outlier": ""}[issue]
            rows.append({"issue": issue, "path": r["path"], "split": "train", "given_label": r["label"],
                         "suggested_label": suggestion, "score": 0.9, "reason": f"test {issue}",
                         "other_path": other["path"] if issue == "duplicate" else "", "row": 0})
    audit = pd.DataFrame(rows, columns=AUDIT_COLUMNS[1:] + ["row"])
    audit.insert(0, "rank", range(1, len(audit) + 1))
    (folder / "audit").mkdir(exist_ok=True)
    audit[AUDIT_COLUMNS + ["row"]].to_csv(folder / "audit" / "audit.csv", index=False)
    pool = table[table["split"] == "unlabeled"].reset_index(drop=True).iloc[:suggested]
    if len(pool) < suggested:
        raise ValueError(f"only {len(pool)} unlabelled photos")
    suggest = pd.DataFrame({"rank": range(1, len(pool) + 1), "image_id": pool["image_id"], "path": pool["path"],
                            "reason": "typical", "score": 0.5, "represents": 1,
                            "best_guess": [species[i % len(species)] if i % 2 == 0 else "" for i in range(len(pool))],
                            "best_guess_prob": [0.8 if i % 2 == 0 else float("nan") for i in range(len(pool))]})
    suggest[SUGGEST_COLUMNS].to_csv(folder / "next.csv", index=False)
    return {"manifest": manifest, "audit": folder / "audit", "suggest": folder / "next.csv", "table": table,
            "audit_table": audit, "suggest_table": suggest, "species": species}


class Server:
    """`finegrain review ... --port 0` in a subprocess; `url` once it printed it."""

    def __init__(self, *args: str, cwd: Path | None = None):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "finegrain", "review", *args, "--port", "0"], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"review server ended: {''.join(self.lines)}")
            self.lines.append(line)
            found = re.search(r"(http://\S+)", line)
            if found:
                self.url = found.group(1)
                self.base = re.sub(r"\?.*$", "", self.url)
                return
        raise RuntimeError("review server printed no URL")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
