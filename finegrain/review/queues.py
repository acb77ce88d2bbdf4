"""The review queues, built once at start from the manifest and the files the person names.

Every photo the app may show is listed here (`Photos`): the manifest's rows, then photos a `predict` CSV
names that are under the manifest's root but not yet in it. The server serves a photo by its number in
that list only, never by a path from a request.

Queues (item kinds), in the order the app offers them:
    label_error  audit.csv rows of issue "label": given vs suggested species
    twin         audit.csv rows of issue "duplicate": the flagged photo and the one it duplicates
    outlier      audit.csv rows of issue "outlier"
    to_label     the photos of a suggest CSV, in its order; without one, every unlabelled photo
    predict      predict CSV rows called `unknown`, or whose best score is below `unsure`
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from finegrain.data.manifest import Manifest
from finegrain.errors import FinegrainError

log = logging.getLogger("finegrain")

QUEUES = {  # kind -> (title, what the person decides)
    "label_error": ("Probable label errors", "Is the given species right, the suggested one, or another?"),
    "twin": ("Twins", "Near-duplicate photos: keep one, keep both, or exclude both?"),
    "outlier": ("Outliers", "Photos far from every other: keep or exclude?"),
    "to_label": ("Photos to label", "Which species is it?"),
    "predict": ("Unknown or unsure predictions", "Confirm the prediction, correct it, or name a new species."),
}
AUDIT_REQUIRED = ("rank", "issue", "path", "given_label", "suggested_label")
AUDIT_KINDS = {"label": "label_error", "duplicate": "twin", "outlier": "outlier"}
EXAMPLES = 3  # example photos shown of a species


@dataclass
class Item:
    """One photo to decide on. photo / other_photo: numbers in Photos; path: its manifest path."""

    id: str
    queue: str
    photo: int
    path: str
    given: str = ""
    suggested: str = ""
    guesses: list[tuple[str, float | None]] = field(default_factory=list)
    reason: str = ""
    other_photo: int | None = None
    other_path: str = ""
    new_row: bool = False


@dataclass
class Photos:
    """Every photo the app may serve: sources[i] is what to read (a file path or a shard record), paths[i] its
    manifest path."""

    sources: list
    paths: list[str]

    def key(self, i: int) -> str:
        """A short name of photo i's location and (for a file) its size and change time, for its cached thumbnails:
        a photo replaced on disk gets a new thumbnail."""
        source = self.sources[i]
        stamp = ""
        if getattr(source, "read", None) is None:
            try:
                st = Path(source).stat()
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                pass
        return hashlib.sha1(f"{source}|{stamp}".encode()).hexdigest()[:16]


@dataclass
class Review:
    """What the app works on: the manifest, its photos, the queues and the species the person may choose."""

    manifest: Manifest
    photos: Photos
    queues: dict[str, list[Item]]
    species: list[str]
    examples: dict[str, list[int]]
    sources: dict

    def item(self, item_id: str) -> Item | None:
        return self._index().get(item_id)

    def _index(self) -> dict[str, Item]:
        if not hasattr(self, "_by_id"):
            self._by_id = {it.id: it for q in self.queues.values() for it in q}
        return self._by_id


def load_review(manifest_path, audit=None, suggest=None, predict=None, unsure: float = 0.5) -> Review:
    """Read the manifest and the queue files; FinegrainError (one line) when one is missing or malformed."""
    manifest = Manifest.load(manifest_path)
    table = manifest.table
    photos = Photos([manifest.abspath(p) for p in table["path"]], list(table["path"]))
    row_of = {p: i for i, p in enumerate(table["path"])}
    queues = {k: [] for k in QUEUES}
    sources = {"manifest": str(Path(manifest_path).resolve()), "manifest_content_hash": manifest.content_hash}
    if audit is not None:
        for item in _audit_items(Path(audit), row_of, sources):
            queues[item.queue].append(item)
    queues["to_label"] = _suggest_items(Path(suggest), row_of, sources) if suggest else [
        Item(f"to_label:{p}", "to_label", row_of[p], p) for p in table.loc[table["split"] == "unlabeled", "path"]]
    if predict is not None:
        queues["predict"] = _predict_items(Path(predict), manifest, photos, row_of, unsure, sources)
    species = manifest.class_names
    examples = {s: [row_of[p] for p in table.loc[(table["label"] == s) & (table["split"] == "train"), "path"][:EXAMPLES]]
                for s in species}
    return Review(manifest, photos, {k: v for k, v in queues.items() if v}, species, examples, sources)


def _read_table(path: Path, what: str, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise FinegrainError(f"{what} not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise FinegrainError(f"{path}: cannot read {what} ({str(e).splitlines()[0]})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise FinegrainError(f"{path}: not a valid {what} (missing column {missing[0]!r})")
    return df


def _file_info(path: Path) -> dict:
    return {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _in_manifest(path: str, row_of: dict, where: Path) -> int:
    if path not in row_of:
        raise FinegrainError(f"{where}: {path} is not in the manifest: was it made on another one?")
    return row_of[path]


def _audit_items(folder: Path, row_of: dict, sources: dict) -> list[Item]:
    """The findings of an audit folder (audit.csv; audit.json beside it is recorded as provenance)."""
    csv = folder / "audit.csv" if folder.is_dir() else folder
    df = _read_table(csv, "audit.csv", AUDIT_REQUIRED)
    summary = csv.with_name("audit.json")
    sources["audit"] = {**_file_info(csv), **({"summary": _json(summary)} if summary.is_file() else {})}
    items = []
    for r in df.itertuples(index=False):
        kind = AUDIT_KINDS.get(r.issue)
        if kind is None:
            raise FinegrainError(f"{csv}: unknown issue {r.issue!r} (rank {r.rank}); expected one of "
                                 f"{', '.join(AUDIT_KINDS)}")
        row = _in_manifest(r.path, row_of, csv)
        other = getattr(r, "other_path", "") or ""
        items.append(Item(f"{kind}:{r.path}", kind, row, r.path, given=r.given_label, suggested=r.suggested_label,
                          reason=getattr(r, "reason", ""), other_path=other,
                          other_photo=_in_manifest(other, row_of, csv) if other else None))
    return items


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FinegrainError(f"{path}: cannot read ({e})") from None


def _suggest_items(csv: Path, row_of: dict, sources: dict) -> list[Item]:
    """The suggested photos in the CSV's order, each with its best guess (when the CSV has one)."""
    df = _read_table(csv, "suggest CSV", ("path",))
    sources["suggest"] = _file_info(csv)
    items = []
    for r in df.to_dict("records"):
        guess = r.get("best_guess", "")
        prob = _float(r.get("best_guess_prob", ""))
        items.append(Item(f"to_label:{r['path']}", "to_label", _in_manifest(r["path"], row_of, csv), r["path"],
                          guesses=[(guess, prob)] if guess else [], reason=r.get("reason", "")))
    return items


def _float(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _predict_items(csv: Path, manifest: Manifest, photos: Photos, row_of: dict, unsure: float,
                   sources: dict) -> list[Item]:
    """Photos `predict` called unknown, or whose best probability is below `unsure`. A photo under the manifest's
    root that is no manifest row is added to Photos (a labelled one becomes a new train row); others are skipped."""
    df = _read_table(csv, "predict CSV", ("path", "pred_1", "score_1"))
    sources["predict"] = {**_file_info(csv), "unsure_below": unsure}
    root, outside, items = manifest.root, 0, []
    for r in df.to_dict("records"):
        if r.get("error"):
            continue
        unknown = r["pred_1"] == "unknown"
        score = _float(r["score_1"])
        if not unknown and (score is None or score >= unsure):
            continue
        rel = _relative(r["path"], csv, root)
        if rel is None:
            outside += 1
            continue
        new = rel not in row_of
        if new:
            row_of[rel] = len(photos.paths)
            photos.sources.append(root / rel)
            photos.paths.append(rel)
        guesses = _predict_guesses(r)
        items.append(Item(f"predict:{rel}", "predict", row_of[rel], rel, given="unknown" if unknown else r["pred_1"],
                          suggested=guesses[0][0] if guesses else "", guesses=guesses, new_row=new,
                          reason="called unknown" if unknown else f"best score {score:.2f} below {unsure:g}"))
    if outside:
        log.warning("review: %d predicted photo(s) outside the manifest's root %s are not queued (move them under "
                    "it to label them)", outside, root)
    return items


def _predict_guesses(r: dict) -> list[tuple[str, float | None]]:
    """The classifier's ranking: nearest_species (for an unknown), then pred_2.., with their scores."""
    guesses, k = [], 1
    while f"pred_{k}" in r:
        name = r.get("nearest_species") if k == 1 and r["pred_1"] == "unknown" else r[f"pred_{k}"]
        if name and name != "unknown" and name not in [g for g, _ in guesses]:
            guesses.append((name, _float(r.get(f"score_{k}"))))
        k += 1
    return guesses[:9]


def _relative(path: str, csv: Path, root: Path) -> str | None:
    """A predict CSV's path as a manifest path (relative to root, POSIX), or None when it is outside root."""
    p = Path(path)
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, csv.parent / p]
    for c in candidates:
        try:
            return c.resolve().relative_to(root).as_posix()
        except ValueError:
            continue
    return None
