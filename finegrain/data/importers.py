"""Build manifests from the layouts users have: CUB-200-2011 folders, image folders, CSV/Parquet lists.

Each importer returns a `Manifest` and logs (logger "finegrain") what it detected, so a user can
see how an ambiguous file was read.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from finegrain.data.images import IMAGE_EXTENSIONS
from finegrain.data.manifest import BBOX_COLUMNS, Manifest
from finegrain.errors import ManifestError

log = logging.getLogger("finegrain")

SPLIT_ALIASES = {
    "train": "train", "training": "train", "trainval": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test", "eval": "test",
    "unlabeled": "unlabeled", "unlabelled": "unlabeled", "unsup": "unlabeled",
}


# --- CUB-200-2011 ---------------------------------------------------------------------------
def _read_cub_file(path: Path, ncols: int) -> tuple[list[list[str]], str]:
    """Rows of a CUB metadata file and the separator found ("comma" or "space").

    The last column may contain spaces (image paths) when the file is space-separated. A first
    line whose id is not an integer is taken as a header and skipped.
    """
    if not path.is_file():
        raise ManifestError(f"CUB layout: {path.name} not found in {path.parent}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ManifestError(f"CUB layout: {path} is empty")
    sep = "comma" if "," in lines[0] else "space"
    rows = []
    for lineno, line in enumerate(lines, 1):
        parts = [p.strip() for p in (line.split(",", ncols - 1) if sep == "comma" else line.split(None, ncols - 1))]
        if lineno == 1 and not re.fullmatch(r"-?\d+", parts[0]):
            continue  # header line
        if len(parts) != ncols:
            raise ManifestError(f"{path}:{lineno}: expected {ncols} fields ({sep}-separated), got {len(parts)}: {line!r}")
        if not re.fullmatch(r"-?\d+", parts[0]):
            raise ManifestError(f"{path}:{lineno}: id {parts[0]!r} is not an integer")
        rows.append(parts)
    return rows, sep


def _clean_class_name(name: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black_footed_Albatross' (CUB's numeric prefix dropped)."""
    return re.sub(r"^\d+\.", "", name.strip())


def import_cub(root: str | os.PathLike) -> Manifest:
    """Read the official CUB-200-2011 layout (and CUB-style variants) into a manifest.

    Expects `images.txt` (id path), `classes.txt` (class_id name), `image_class_labels.txt`
    (id class_id), `train_test_split.txt` (id is_train) and optionally `bounding_boxes.txt`
    (id x y w h, pixels), with images under `images/`. Comma or whitespace separators and 0- or
    1-based ids are accepted; what was detected is logged.

    Raises:
        ManifestError: a file is missing or malformed, or ids do not match between files.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ManifestError(f"CUB root is not a folder: {root}")
    images, sep_i = _read_cub_file(root / "images.txt", 2)
    classes, sep_c = _read_cub_file(root / "classes.txt", 2)
    labels, sep_l = _read_cub_file(root / "image_class_labels.txt", 2)
    splits, sep_s = _read_cub_file(root / "train_test_split.txt", 2)

    image_path = {int(i): p.replace("\\", "/") for i, p in images}
    class_name = {int(c): _clean_class_name(n) for c, n in classes}
    image_class = {int(i): int(c) for i, c in labels}
    image_split = {}
    for i, flag in splits:
        value = flag.strip().lower()
        if value in ("1", "train", "true"):
            image_split[int(i)] = "train"
        elif value in ("0", "test", "false"):
            image_split[int(i)] = "test"
        else:
            raise ManifestError(f"train_test_split.txt: image {i} has is_train {flag!r}; expected 1 or 0")

    ids = sorted(image_path)
    for name, mapping in (("image_class_labels.txt", image_class), ("train_test_split.txt", image_split)):
        missing = [i for i in ids if i not in mapping]
        if missing:
            raise ManifestError(f"CUB layout: {name} has no entry for image id(s) {missing[:5]} ({len(missing)} in all)")
    unknown = sorted({c for c in image_class.values() if c not in class_name})
    if unknown:
        raise ManifestError(
            f"CUB layout: image_class_labels.txt uses class id(s) {unknown[:5]} that classes.txt does not define "
            f"(classes.txt ids run {min(class_name)}..{max(class_name)})"
        )
    image_base = min(ids)
    class_base = min(class_name)
    folder = "images" if (root / "images").is_dir() else "."
    table = pd.DataFrame({
        "image_id": [str(i) for i in ids],
        "path": [f"{folder}/{image_path[i]}" if folder != "." else image_path[i] for i in ids],
        "label": [class_name[image_class[i]] for i in ids],
        "split": [image_split[i] for i in ids],
    })
    seps = sorted({sep_i, sep_c, sep_l, sep_s})
    bbox_file = root / "bounding_boxes.txt"
    if bbox_file.is_file():
        boxes, sep_b = _read_cub_file(bbox_file, 2)
        seps = sorted(set(seps) | {sep_b})
        parsed = {}
        for i, rest in boxes:
            values = [v for v in re.split(r"[,\s]+", rest.strip()) if v]
            if len(values) != 4:
                raise ManifestError(f"bounding_boxes.txt: image {i} has {len(values)} values; expected x y w h")
            parsed[int(i)] = [float(v) for v in values]
        for j, col in enumerate(BBOX_COLUMNS):
            table[col] = [parsed[i][j] if i in parsed else np.nan for i in ids]
        log.info("CUB: %d bounding boxes read from bounding_boxes.txt", len(parsed))
    else:
        log.info("CUB: no bounding_boxes.txt; manifest has no boxes")
    log.info(
        "CUB: detected %s-separated files, %d-based image ids, %d-based class ids",
        "/".join(seps), image_base, class_base,
    )
    manifest = Manifest.from_table(table, root)
    counts = manifest.split_counts()
    log.info(
        "CUB: %d images, %d classes (%s)",
        len(manifest), len(manifest.class_names), ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
    )
    return manifest


# --- image folders --------------------------------------------------------------------------
def _is_hidden_below(path: Path, top: Path) -> bool:
    """True when a part of `path` below `top` starts with "." (`top`'s own ancestors never count)."""
    return any(part.startswith(".") for part in path.relative_to(top).parts)


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere under `folder`, sorted, skipping hidden files and folders below it.

    Only the parts below `folder` are checked, so a dataset kept in `~/.cache/birds` is found.
    """
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden_below(p, folder)
    )


def import_folder(root: str | os.PathLike) -> Manifest:
    """Build a manifest from `ROOT/<class>/*` or `ROOT/<split>/<class>/*` image folders.

    With the split layout, top-level folders are split names (train/val/test, with common
    aliases such as "validation"); `ROOT/unlabeled/**` holds images without labels. With the
    class layout every image goes to split "train" (use `manifest split` to hold some out).
    Images in sub-folders of a class folder belong to that class.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ManifestError(f"image folder not found: {root}")
    top = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not top:
        raise ManifestError(f"{root} has no sub-folders; expected ROOT/<class>/* or ROOT/<split>/<class>/*")
    split_layout = all(d.name.lower() in SPLIT_ALIASES for d in top)
    rows = []

    def add(split: str, label: str, folder: Path) -> None:
        for p in _images_under(folder):
            rel = p.relative_to(root).as_posix()
            rows.append({"image_id": rel, "path": rel, "label": label, "split": split})

    if split_layout:
        for d in top:
            split = SPLIT_ALIASES[d.name.lower()]
            if split == "unlabeled":
                add(split, "", d)
                continue
            for c in sorted(x for x in d.iterdir() if x.is_dir() and not x.name.startswith(".")):
                add(split, c.name, c)
        log.info("folder: split layout ROOT/<split>/<class>/* with splits %s", ", ".join(d.name for d in top))
    else:
        for c in top:
            add("train", c.name, c)
        log.info("folder: class layout ROOT/<class>/*; every image is in split 'train'")
    loose = [p for p in root.iterdir()
             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
    if loose:
        log.warning("folder: %d image(s) directly in %s have no class folder and were left out", len(loose), root)
    if not rows:
        raise ManifestError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root}")
    manifest = Manifest.from_table(pd.DataFrame(rows), root)
    log.info("folder: %d images, %d classes", len(manifest), len(manifest.class_names))
    return manifest


# --- a user's own table ---------------------------------------------------------------------
def import_table(
    file: str | os.PathLike,
    *,
    path_col: str,
    label_col: str | None = None,
    split_col: str | None = None,
    id_col: str | None = None,
    bbox_cols: tuple[str, str, str, str] | None = None,
    root: str | os.PathLike | None = None,
) -> Manifest:
    """Build a manifest from a user's CSV, TSV or Parquet list of images.

    Args:
        file: the table. Relative image paths are relative to `root`.
        path_col: column with image paths (relative or absolute).
        label_col: column with class names; rows with an empty label become split "unlabeled".
        split_col: column with split names (train/val/test/unlabeled and common aliases); without
            it, labelled rows are "train" and unlabelled rows "unlabeled".
        id_col: column with unique image ids (default: the path).
        bbox_cols: four columns holding x, y, w, h in pixels.
        root: dataset root; default: the common folder of absolute paths, else the table's folder.
    """
    file = Path(file).expanduser()
    if not file.is_file():
        raise ManifestError(f"table not found: {file}")
    suffix = file.suffix.lower()
    try:
        if suffix == ".parquet":
            src = pd.read_parquet(file)
        else:
            src = pd.read_csv(file, dtype=str, keep_default_na=False, sep="\t" if suffix == ".tsv" else ",")
    except Exception as e:  # noqa: BLE001
        raise ManifestError(f"{file}: cannot read table ({e})") from None
    wanted = [c for c in (path_col, label_col, split_col, id_col, *(bbox_cols or ())) if c]
    absent = [c for c in wanted if c not in src.columns]
    if absent:
        raise ManifestError(f"{file}: no column(s) {', '.join(absent)}; the table has {', '.join(map(str, src.columns))}")

    paths = src[path_col].fillna("").astype(str).str.strip().str.replace("\\", "/", regex=False)
    absolute = paths.map(lambda p: os.path.isabs(p))
    if root is None:
        root = os.path.commonpath([os.path.dirname(p) for p in paths]) if len(paths) and absolute.all() else file.resolve().parent
    root = Path(root).expanduser().resolve()
    paths = paths.where(~absolute, paths.map(lambda p: Path(os.path.relpath(p, root)).as_posix()))

    labels = src[label_col].fillna("").astype(str).str.strip() if label_col else pd.Series([""] * len(src))
    if split_col:
        raw = src[split_col].fillna("").astype(str).str.strip().str.lower()
        unknown = sorted(set(raw) - set(SPLIT_ALIASES))
        if unknown:
            raise ManifestError(
                f"{file}: column {split_col} has unknown split value(s) {unknown[:5]}; "
                f"use train, val, test or unlabeled"
            )
        splits = raw.map(SPLIT_ALIASES)
        # A row marked unlabeled keeps no label, as the schema asks.
        labels = labels.where(splits != "unlabeled", "")
    else:
        splits = pd.Series(np.where(labels == "", "unlabeled", "train"))
    table = pd.DataFrame({
        "image_id": src[id_col].astype(str).str.strip() if id_col else paths,
        "path": paths,
        "label": labels.to_numpy(),
        "split": splits.to_numpy(),
    })
    if bbox_cols:
        for col, src_col in zip(BBOX_COLUMNS, bbox_cols):
            table[col] = src[src_col].to_numpy()
    manifest = Manifest.from_table(table, root)
    log.info(
        "table: %d images, %d classes, root %s (%s)", len(manifest), len(manifest.class_names), root,
        ", ".join(f"{k} {v}" for k, v in sorted(manifest.split_counts().items())),
    )
    return manifest
