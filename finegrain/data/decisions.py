"""The decisions a person made in `finegrain review`: one SQLite file, REVIEW_DIR/decisions.sqlite.

Durable the moment `record` returns: WAL journal with synchronous=FULL and a commit per decision, so a
SIGKILL (or a power cut) after the page showed "saved" loses nothing. Undo marks the latest decisions
undone (kept in the file, so the log stays append-only in spirit). Standard library only: `manifest
relabel --from REVIEW_DIR` reads it without the web app.

Tables:
    decisions(seq, item, queue, action, label, path, other_path, new_row, at, undone_at)
        item: the queue item's stable id; queue: label_error | twin | outlier | to_label | predict;
        action: what the person chose (see ACTIONS); label: the species it gives (or ""); path: the manifest
        path of the photo decided on; other_path: a twin's partner; new_row: 1 when the photo is not yet a
        manifest row (a predicted photo under the root); at / undone_at: UTC ISO times.
    meta(key, value): JSON values: the manifest and the queue files the review was started with.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from finegrain.errors import FinegrainError

DECISIONS_FILE = "decisions.sqlite"
# queue -> the actions it accepts
ACTIONS = {
    "label_error": ("suggested", "given", "other", "exclude"),
    "twin": ("keep_one", "keep_both", "exclude"),
    "outlier": ("keep", "exclude"),
    "to_label": ("label", "new", "not_bird", "skip"),
    "predict": ("confirm", "label", "new", "exclude", "skip"),
}
LABEL_ACTIONS = {"suggested", "other", "label", "new", "confirm"}  # actions that give the photo `label`

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, item TEXT NOT NULL, queue TEXT NOT NULL, action TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '', path TEXT NOT NULL, other_path TEXT NOT NULL DEFAULT '',
    new_row INTEGER NOT NULL DEFAULT 0, at TEXT NOT NULL, undone_at TEXT);
CREATE INDEX IF NOT EXISTS decisions_item ON decisions(item);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Decision:
    """One stored decision (see the module docstring for the fields)."""

    seq: int
    item: str
    queue: str
    action: str
    label: str
    path: str
    other_path: str
    new_row: bool
    at: str


class DecisionLog:
    """The decisions file of a review folder; safe to share between threads (one connection, one lock)."""

    def __init__(self, folder: str | Path, *, create: bool = True):
        self.path = Path(folder) / DECISIONS_FILE
        if not create and not self.path.is_file():
            raise FinegrainError(f"{folder} holds no {DECISIONS_FILE}: is it a folder `finegrain review -o` wrote?")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise FinegrainError(f"{self.path}: not a readable decisions file ({e})") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    # --- writing: each call is one committed transaction ---------------------------------------------
    def record(self, item: str, queue: str, action: str, path: str, *, label: str = "", other_path: str = "",
               new_row: bool = False) -> Decision:
        """Store a decision durably (committed, fsynced) and return it. Raises ValueError on an unknown action."""
        if action not in ACTIONS.get(queue, ()):
            raise ValueError(f"queue {queue!r} takes {', '.join(ACTIONS.get(queue, ()))}, not {action!r}")
        if action in LABEL_ACTIONS and not label.strip():
            raise ValueError(f"action {action!r} needs a species name")
        at = _now()
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.execute(
                "INSERT INTO decisions(item, queue, action, label, path, other_path, new_row, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (item, queue, action, label.strip(), path, other_path,
                                                    int(new_row), at))
            seq = cur.lastrowid
        return Decision(seq, item, queue, action, label.strip(), path, other_path, new_row, at)

    def undo(self) -> Decision | None:
        """Mark the latest decision still in force undone; return it (None: nothing to undo)."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(f"SELECT {_COLUMNS} FROM decisions WHERE undone_at IS NULL "
                                   "ORDER BY seq DESC LIMIT 1").fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE decisions SET undone_at = ? WHERE seq = ?", (_now(), row[0]))
        return _decision(row)

    def set_meta(self, key: str, value) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # --- reading ---------------------------------------------------------------------------------------
    def meta(self) -> dict:
        with self._lock:
            return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}

    def in_force(self) -> list[Decision]:
        """Every decision not undone, oldest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM decisions WHERE undone_at IS NULL ORDER BY seq").fetchall()
        return [_decision(r) for r in rows]

    def latest(self) -> dict[str, Decision]:
        """item -> its latest decision in force (a later decision on the same item replaces an earlier one)."""
        return {d.item: d for d in self.in_force()}


_COLUMNS = "seq, item, queue, action, label, path, other_path, new_row, at"


def _decision(row) -> Decision:
    return Decision(int(row[0]), row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]), row[8])
