"""Find every problem in a manifest and its files before any training starts.

One pass reads each file once (in threads: decoding releases the GIL), hashes its bytes, decodes
it and checks its size, then table-level checks run on the results. The report lists errors
(which stop a stage) and warnings, each naming the file and the reason.
"""

from __future__ import annotations

import dataclasses

import hashlib
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from finegrain.data.images import DEFAULT_MAX_PIXELS, decode_image
from finegrain.data.manifest import Manifest
from finegrain.errors import BadImageError, FinegrainError, ManifestError
from finegrain.progress import track

log = logging.getLogger("finegrain")

# Splits whose images a model may learn from; an image shared with "test" leaks.
FIT_SPLITS = ("train", "val", "unlabeled")
# Validation decodes JPEGs at reduced scale: a truncated or corrupt file still fails, 4-8x faster.
_CHECK_MIN_SIDE = 64


@dataclass(frozen=True)
class Problem:
    """One finding. severity: "error" or "warning"; kind: a stable short code; path: the file (or None)."""

    severity: str
    kind: str
    message: str
    path: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass
class ValidationReport:
    """Everything `validate_manifest` found.

    Attributes:
        problems: errors and warnings, in the order found.
        class_counts: DataFrame indexed by class name with one column per split (image counts).
        n_images: rows checked.
    """

    problems: list[Problem] = field(default_factory=list)
    class_counts: pd.DataFrame = field(default_factory=pd.DataFrame)
    n_images: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    @property
    def bad_files(self) -> set[str]:
        """Manifest paths with a file-level error (missing, undecodable, escaping the root)."""
        return {p.path for p in self.errors if p.path and p.kind in FILE_ERRORS}

    def summary(self) -> str:
        """One line: images, classes, errors, warnings."""
        return (
            f"{self.n_images} images, {len(self.class_counts)} classes: "
            f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        )

    def raise_for_errors(self, *, skip_bad_files: bool = False) -> None:
        """Raise ManifestError listing the errors. With skip_bad_files, file-level errors are allowed."""
        blocking = [p for p in self.errors if not (skip_bad_files and p.kind in FILE_ERRORS)]
        if blocking:
            shown = "\n  - ".join(str(p) for p in blocking[:20])
            more = f"\n  ... and {len(blocking) - 20} more" if len(blocking) > 20 else ""
            raise ManifestError(f"manifest check failed ({len(blocking)} error(s)):\n  - {shown}{more}")


FILE_ERRORS = frozenset({"missing_file", "bad_image", "path_escapes_root"})


def _inside(root: Path, rel: str) -> bool:
    if os.path.isabs(rel):
        return False
    full = os.path.normpath(os.path.join(root, rel))
    return os.path.commonpath([full, str(root)]) == str(root)


def _check_file(path: Path, rel: str, max_pixels: int) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """(content hash, (w, h), error reason) for one file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None, "missing"
    except OSError as e:
        return None, None, f"cannot read file ({e.strerror or e})"
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        decoded = decode_image(data, min_side=_CHECK_MIN_SIDE, max_pixels=max_pixels, name=rel)
    except BadImageError as e:
        return digest, None, e.reason
    return digest, decoded.original_size, None


def validate_manifest(
    manifest: Manifest,
    *,
    decode: bool = True,
    allow_unseen_classes: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    progress: bool = False,
) -> ValidationReport:
    """Check a manifest's files and table; return every problem found.

    Checks: paths escaping the root; missing files; files that do not decode (or are too small,
    or too large: decompression bombs); duplicate images by content hash (an error when the same
    image is in test and in a split used for fitting, a warning otherwise); classes that have
    val/test images but no training images (an error unless `allow_unseen_classes`, as in the
    zero-shot retrieval protocol); bounding boxes outside the image; classes with one image.

    Args:
        manifest: the manifest to check.
        decode: read and decode every file (False: only check that files exist).
        allow_unseen_classes: report classes without training images as warnings, not errors.
        max_pixels: images above this pixel count are refused.
        workers: decoding threads (default: 2 x CPU count, at most 16).
        progress: show a progress bar (rich) while reading files.
    """
    report = ValidationReport(n_images=len(manifest))
    table = manifest.table
    add = report.problems.append
    root = manifest.root
    if not root.is_dir():
        add(Problem("error", "missing_root", f"dataset root folder not found: {root}"))
    if table.empty:
        add(Problem("error", "empty_manifest", "the manifest has no rows"))

    rels = table["path"].tolist()
    inside = [_inside(root, r) for r in rels]
    for rel, ok in zip(rels, inside):
        if not ok:
            add(Problem("error", "path_escapes_root", f"path leaves the dataset root {root}", rel))

    # shard records were read when they were written (`manifest shard`); a bad one is skipped, named, when read
    todo = [] if manifest.shards is not None else [i for i, ok in enumerate(inside) if ok]
    hashes: dict[int, str] = {}
    sizes: dict[int, tuple[int, int]] = {}

    def work(i: int):
        path = root / rels[i]
        if not decode:
            return i, None, None, (None if path.is_file() else "missing")
        return (i, *_check_file(path, rels[i], max_pixels))

    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(work, todo)
        if progress:
            results = track(results, total=len(todo), description="checking images")
        for i, digest, size, reason in results:
            if reason == "missing":
                add(Problem("error", "missing_file", "file not found", rels[i]))
            elif reason:
                add(Problem("error", "bad_image", reason, rels[i]))
            if digest:
                hashes[i] = digest
            if size:
                sizes[i] = size

    _check_duplicates(table, hashes, add)
    _check_classes(table, allow_unseen_classes, add)
    if manifest.has_bboxes:
        _check_boxes(table, sizes, add)
    report.class_counts = (
        table[table["label"] != ""].groupby(["label", "split"]).size().unstack(fill_value=0)
        if (table["label"] != "").any() else pd.DataFrame()
    )
    return report


def _check_duplicates(table: pd.DataFrame, hashes: dict[int, str], add) -> None:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, h in hashes.items():
        groups[h].append(i)
    for rows in groups.values():
        if len(rows) < 2:
            continue
        rows.sort()
        paths = [table.at[i, "path"] for i in rows]
        splits = {table.at[i, "split"] for i in rows}
        labels = {table.at[i, "label"] for i in rows} - {""}
        first, others = paths[0], ", ".join(paths[1:])
        if "test" in splits and splits & set(FIT_SPLITS):
            add(Problem("error", "train_test_overlap", f"the same image is in test and in {'/'.join(sorted(splits - {'test'}))}: {others}", first))
        else:
            add(Problem("warning", "duplicate_image", f"identical file(s): {others}", first))
        if len(labels) > 1:
            add(Problem("warning", "conflicting_labels", f"identical images carry different labels {sorted(labels)}", first))


def _check_classes(table: pd.DataFrame, allow_unseen: bool, add) -> None:
    labelled = table[table["label"] != ""]
    if labelled.empty:
        return
    train_counts = labelled[labelled["split"] == "train"]["label"].value_counts()
    for label in classes_without_train(table):
        where = sorted(set(labelled.loc[labelled["label"] == label, "split"]))
        add(Problem(
            "warning" if allow_unseen else "error", "class_without_train",
            f"class {label!r} has no training images (only {'/'.join(where)})",
        ))
    for label, n in sorted(train_counts.items()):
        if n == 1:
            add(Problem("warning", "few_images", f"class {label!r} has a single training image"))


def _check_boxes(table: pd.DataFrame, sizes: dict[int, tuple[int, int]], add) -> None:
    boxes = table[["bbox_x", "bbox_y", "bbox_w", "bbox_h"]].to_numpy(dtype=np.float64)
    for i, (x, y, w, h) in enumerate(boxes):
        if np.isnan(w):
            continue
        rel = table.at[i, "path"]
        if w <= 0 or h <= 0:
            add(Problem("error", "bad_bbox", f"bounding box has non-positive size (w={w:g}, h={h:g})", rel))
            continue
        if i not in sizes:
            continue
        iw, ih = sizes[i]
        if x >= iw or y >= ih or x + w <= 0 or y + h <= 0:
            add(Problem("error", "bad_bbox", f"bounding box ({x:g}, {y:g}, {w:g}, {h:g}) lies outside the {iw}x{ih} image", rel))
        elif x < -1 or y < -1 or x + w > iw + 1 or y + h > ih + 1:
            add(Problem("warning", "bbox_clipped", f"bounding box ({x:g}, {y:g}, {w:g}, {h:g}) extends past the {iw}x{ih} image; it will be clipped", rel))


def check_manifest_or_raise(manifest: Manifest, *, on_bad_image: str = "error", progress: bool = True,
                            allow_unseen_classes: bool = False) -> tuple[Manifest, ValidationReport]:
    """Validate before a stage trains; return the manifest to use (bad files dropped if skipping).

    Args:
        on_bad_image: "error" stops on any error; "skip" drops rows whose file is missing or does
            not decode and stops only on other errors.
        allow_unseen_classes: classes without training images are warnings (stages: they are left out of
            training and are unknown species to evaluate and predict).

    Raises:
        ManifestError: with the list of blocking problems.
    """
    if on_bad_image not in ("error", "skip"):
        raise ManifestError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    report = validate_manifest(manifest, progress=progress, allow_unseen_classes=allow_unseen_classes)
    report.raise_for_errors(skip_bad_files=on_bad_image == "skip")
    bad = report.bad_files
    if bad:
        manifest = dataclasses.replace(manifest, table=manifest.table[~manifest.table["path"].isin(bad)].reset_index(drop=True))
    return manifest, report


UNSEEN_NOTES = ("warn", "quiet")


def load_checked_manifest(path, *, root=None, on_bad_image: str = "error", progress: bool = True,
                          unseen_classes: str = "warn") -> Manifest:
    """Load a manifest and validate it before a stage runs (bad files dropped with on_bad_image "skip", and named).

    Species with val/test photos but no train photos are allowed: stages train on the species that have train
    photos, and evaluate and predict treat the others as unknown (open set). unseen_classes: "warn" says so in one
    line with their count; "quiet" only at debug level (suggest's cold start, where no species has train photos).
    """
    if not path:
        raise FinegrainError("--manifest is required")
    if unseen_classes not in UNSEEN_NOTES:
        raise ValueError(f"unseen_classes must be one of {UNSEEN_NOTES}, got {unseen_classes!r}")
    manifest = Manifest.load(path, root=root)
    manifest, report = check_manifest_or_raise(manifest, on_bad_image=on_bad_image, progress=progress,
                                                allow_unseen_classes=True)
    skipped = [p for p in report.errors if p.path in report.bad_files]
    if skipped:
        log.warning("--on-bad-image skip: leaving out %d file(s):\n  - %s%s", len(skipped),
                    "\n  - ".join(str(p) for p in skipped[:20]), "\n  ..." if len(skipped) > 20 else "")
    unseen = classes_without_train(manifest.table)
    if unseen:
        log.log(logging.WARNING if unseen_classes == "warn" else logging.DEBUG, "manifest: %s", unseen_summary(unseen))
    for line in warning_lines([p for p in report.warnings if p.kind != "class_without_train"]):
        log.warning("manifest: %s", line)
    return manifest


def classes_without_train(table: pd.DataFrame) -> list[str]:
    """The labels of labelled rows (val, test) that no train row carries, sorted."""
    labelled = table[table["label"] != ""]
    return sorted(set(labelled["label"]) - set(labelled.loc[labelled["split"] == "train", "label"]))


def unseen_summary(names: list[str]) -> str:
    """One line for the classes without train photos: their count, a few names and what stages do with them."""
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return (f"{len(names)} {'class has' if len(names) == 1 else 'classes have'} val/test photos but no train photos "
            f"({shown}): training leaves them out; evaluate and predict treat them as unknown species")


def warning_lines(warnings: list[Problem], per_kind: int = 3) -> list[str]:
    """The warnings as lines: a kind found once is shown as it is; a kind found more often is one line with its
    count and the first `per_kind` (a manifest of 200 species with one photo each gives one line, not 200)."""
    by_kind: dict[str, list[Problem]] = defaultdict(list)
    for p in warnings:
        by_kind[p.kind].append(p)
    lines = []
    for kind, found in by_kind.items():
        if len(found) == 1:
            lines.append(str(found[0]))
        else:
            more = f"; ... ({len(found) - per_kind} more)" if len(found) > per_kind else ""
            lines.append(f"{len(found)} x {kind.replace('_', ' ')}: " + "; ".join(map(str, found[:per_kind])) + more)
    return lines
