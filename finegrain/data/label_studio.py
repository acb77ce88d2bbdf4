"""Label Studio interop: import tasks with finegrain's guesses as pre-annotations, and labels back from an export.

The formats are Label Studio's documented "basic JSON" (labelstud.io/guide/tasks, /guide/predictions,
/guide/export): a task is {"data": {...}, "predictions": [{"model_version", "score", "result": [...]}]}; an export
is the same list with "annotations": [{"result": [...], "was_cancelled": ...}]. An image classification result is
{"from_name": "species", "to_name": "image", "type": "choices", "value": {"choices": [name]}}. label-studio-sdk's
converters turn exports into COCO/YOLO/CSV, not into these tasks, and would add a large dependency for two keys of
JSON, so the files are read and written here.

Photos: `data.image` is a Label Studio local-files URL (`/data/local-files/?d=<absolute path without its leading
/>`: start Label Studio with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and
LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=/), and `data.finegrain_path` the manifest path, which is how labels find
their row again. The choice EXCLUDE leaves a photo out.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from urllib.parse import quote, unquote

from finegrain.errors import FinegrainError
from finegrain.fsutil import atomic_write_text

FROM_NAME, TO_NAME = "species", "image"
EXCLUDE = "(exclude: not a bird, a twin, unusable)"
LOCAL_FILES = "/data/local-files/?d="


def label_config(species: list[str]) -> str:
    """The labeling interface (Label Studio XML) the tasks are made for: the photo and one choice of species."""
    choices = "".join(f'\n    <Choice value="{escape(s, quote=True)}"/>' for s in [*species, EXCLUDE])
    return (f'<View>\n  <Image name="{TO_NAME}" value="${TO_NAME}"/>\n  <Choices name="{FROM_NAME}" '
            f'toName="{TO_NAME}" choice="single" showInline="false">{choices}\n  </Choices>\n</View>\n')


def _choice(name: str) -> dict:
    return {"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [name]}}


def task(path: str, absolute: str | Path, guess: str = "", score: float | None = None, model_version: str = "finegrain",
         **data) -> dict:
    """One import task: the photo (manifest `path`, file `absolute`), extra `data` fields shown in Label Studio, and
    `guess` (a species, or EXCLUDE) as a pre-annotation with its `score`."""
    url = LOCAL_FILES + quote(str(Path(absolute).resolve()).lstrip("/"))
    out = {"data": {TO_NAME: url, "finegrain_path": path, **{k: v for k, v in data.items() if v not in (None, "")}}}
    if guess:
        prediction = {"model_version": model_version, "result": [_choice(guess)]}
        if score is not None and score == score:  # not NaN
            prediction["score"] = float(score)
        out["predictions"] = [prediction]
    return out


def write_tasks(out: str | Path, tasks: list[dict], species: list[str]) -> tuple[Path, Path]:
    """Write the tasks (JSON) and, beside them, OUT.label_config.xml for the Label Studio project; returns both."""
    out = Path(out)
    config = out.with_suffix(".label_config.xml")
    atomic_write_text(out, json.dumps(tasks, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(config, label_config(species))
    return out, config


def read_export(path: str | Path) -> list[tuple[str, str]]:
    """(manifest path, chosen species or EXCLUDE) for every task of a Label Studio JSON export with a species
    chosen in its latest annotation that was not cancelled; tasks without one are left out."""
    path = Path(path)
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FinegrainError(f"{path}: cannot read a Label Studio JSON export ({e})") from None
    if not isinstance(tasks, list):
        raise FinegrainError(f"{path}: a Label Studio JSON export is a list of tasks")
    found = []
    for n, t in enumerate(tasks):
        data = t.get("data") if isinstance(t, dict) else None
        if not isinstance(data, dict):
            raise FinegrainError(f"{path}: task {n} has no 'data' object: not a Label Studio JSON export")
        where = data.get("finegrain_path") or _local_path(str(data.get(TO_NAME, "")))
        if not where:
            raise FinegrainError(f"{path}: task {n} names no photo (data.finegrain_path or a local-files image)")
        chosen = _latest_choice(t.get("annotations") or [])
        if chosen:
            found.append((where, chosen))
    return found


def _latest_choice(annotations: list) -> str | None:
    done = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    for a in sorted(done, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""), reverse=True):
        for r in a.get("result") or []:
            if r.get("type") == "choices" and r.get("from_name") == FROM_NAME and r.get("value", {}).get("choices"):
                return str(r["value"]["choices"][0])
    return None


def _local_path(url: str) -> str:
    """'/data/local-files/?d=home/me/x.jpg' -> '/home/me/x.jpg' ('' for any other URL)."""
    return "/" + unquote(url[len(LOCAL_FILES):]) if url.startswith(LOCAL_FILES) else ""


def export_decisions(manifest, found: list[tuple[str, str]], where: str) -> list:
    """read_export's (path, choice) pairs as review decisions (data/decisions.py) on `manifest`'s rows: a species
    labels the photo, EXCLUDE leaves it out. A path may be the manifest path or the photo's absolute path."""
    from finegrain.data.decisions import Decision

    by_abs = {str((manifest.root / p).resolve()): p for p in manifest.table["path"]}
    known = set(manifest.table["path"])
    out = []
    for seq, (path, choice) in enumerate(found, start=1):
        row = path if path in known else by_abs.get(str(Path(path).resolve())) if Path(path).is_absolute() else None
        if row is None:
            raise FinegrainError(f"{where}: {path} is not a photo of the manifest: was the export made from another one?")
        action = "not_bird" if choice == EXCLUDE else "label"
        out.append(Decision(seq, f"label-studio:{row}", "to_label", action, "" if action == "not_bird" else choice,
                            row, "", False, ""))
    return out
