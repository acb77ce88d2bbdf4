"""The manifest: one table, one row per image, saved as CSV or Parquet with its root and hash.

Columns (see data_manifests/README.md):
    image_id  str, unique
    path      str, relative to the dataset root (POSIX separators)
    label     str, class name; "" for unlabeled images
    split     one of train, val, test, unlabeled
    bbox_x, bbox_y, bbox_w, bbox_h   optional float pixels (all four or none; NaN = no box)
Extra columns are kept as they are.

Metadata (format version, dataset root relative to the file and absolute, content hash, row count):
    Parquet: in the schema metadata under key "finegrain".
    CSV: in a JSON sidecar `NAME.csv.json` beside `NAME.csv`, so the CSV itself is a plain table
        that pandas.read_csv, DuckDB or a spreadsheet open as-is (header row, no comment lines).
        A sidecar rather than an extra column (repeated on every row, and a column users must
        drop) or a comment line (what older versions wrote; plain readers trip over it). It is
        named after the whole file name so `m.csv`, `m.parquet` and an unrelated `m.json` never
        collide. Without a sidecar a CSV is a user's table: its root is its own folder.
    Old CSVs whose first line is `# finegrain-manifest {json}` still load; that line wins over a
        sidecar (it travels with the rows it describes).
The stored hash is informational: `content_hash` is always computed from the rows, so a CSV edited
in a spreadsheet loads with its new hash (and a stale sidecar still gives the root).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from finegrain.errors import ManifestError
from finegrain.fsutil import atomic_path, atomic_write_text

if TYPE_CHECKING:
    import torch

REQUIRED_COLUMNS = ("image_id", "path", "label", "split")
BBOX_COLUMNS = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")
SPLITS = ("train", "val", "test", "unlabeled")
FORMAT_VERSION = 1  # schema version; part of content_hash, so a file-layout change must not bump it
_CSV_MAGIC = "# finegrain-manifest "  # first line of CSVs older versions wrote (read, no longer written)
_PARQUET_KEY = b"finegrain"


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON metadata file that goes with a CSV manifest: `m.csv` -> `m.csv.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _read_sidecar(path: Path) -> dict:
    """The metadata in `path`'s sidecar, or {} when there is none (a user's own table)."""
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ManifestError(f"{side}: cannot read manifest metadata ({e}); fix it or delete it") from None
    if not isinstance(meta, dict):
        raise ManifestError(f"{side}: manifest metadata must be a JSON object; fix it or delete it")
    return meta


def _read_csv(path: Path) -> tuple[pd.DataFrame, dict]:
    """(table of str, metadata) of a CSV/TSV manifest: from an old comment line, else the sidecar."""
    with open(path, encoding="utf-8", newline="") as f:
        first = f.readline()
        if first.startswith(_CSV_MAGIC):
            meta = json.loads(first[len(_CSV_MAGIC):])
        else:
            f.seek(0)
            meta = None
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
        table = pd.read_csv(f, dtype=str, keep_default_na=False, sep=sep)
    return table, (_read_sidecar(path) if meta is None else meta)


def _examples(values, n: int = 5) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:n])
    return shown + (f" ... ({len(values)} in all)" if len(values) > n else "")


def normalize_table(table: pd.DataFrame) -> pd.DataFrame:
    """Check a table against the manifest schema and return a normalised copy.

    Raises:
        ManifestError: listing every schema problem found (missing columns, unknown splits,
            empty or duplicated ids/paths, labels where there should be none, bad boxes).
    """
    problems: list[str] = []
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ManifestError(
            f"manifest is missing column(s) {', '.join(missing)}; it has {', '.join(map(str, table.columns))}. "
            f"Required: {', '.join(REQUIRED_COLUMNS)}."
        )
    df = table.copy().reset_index(drop=True)
    for col in REQUIRED_COLUMNS:
        df[col] = df[col].fillna("").astype(str).str.strip()
    df["split"] = df["split"].str.lower()
    df["path"] = df["path"].str.replace("\\", "/", regex=False)

    bad_split = sorted(set(df["split"]) - set(SPLITS))
    if bad_split:
        problems.append(f"unknown split value(s) {_examples(bad_split)}; allowed: {', '.join(SPLITS)}")
    empty_path = df.index[df["path"] == ""]
    if len(empty_path):
        problems.append(f"{len(empty_path)} row(s) have an empty path (rows {_examples(empty_path.tolist())})")
    empty_id = df.index[df["image_id"] == ""]
    if len(empty_id):
        problems.append(f"{len(empty_id)} row(s) have an empty image_id (rows {_examples(empty_id.tolist())})")
    dup_ids = df["image_id"][df["image_id"].duplicated() & (df["image_id"] != "")]
    if len(dup_ids):
        problems.append(f"duplicated image_id(s): {_examples(sorted(set(dup_ids)))}")
    dup_paths = df["path"][df["path"].duplicated() & (df["path"] != "")]
    if len(dup_paths):
        problems.append(f"duplicated row(s) for path(s): {_examples(sorted(set(dup_paths)))}")
    labelled_split = df["split"].isin(["train", "val", "test"])
    no_label = df.loc[labelled_split & (df["label"] == ""), "path"]
    if len(no_label):
        problems.append(
            f"{len(no_label)} train/val/test row(s) have no label (use split 'unlabeled' for "
            f"images without one): {_examples(no_label.tolist())}"
        )
    hidden = df.loc[(df["split"] == "unlabeled") & (df["label"] != ""), "path"]
    if len(hidden):
        problems.append(
            f"{len(hidden)} row(s) in split 'unlabeled' have a label; leave it empty: {_examples(hidden.tolist())}"
        )

    present = [c for c in BBOX_COLUMNS if c in df.columns]
    if present and len(present) != len(BBOX_COLUMNS):
        problems.append(f"bounding boxes need all of {', '.join(BBOX_COLUMNS)}; found only {', '.join(present)}")
    elif present:
        for c in BBOX_COLUMNS:
            raw = df[c].replace("", np.nan)
            num = pd.to_numeric(raw, errors="coerce")
            bad = df.loc[num.isna() & raw.notna(), "path"]
            if len(bad):
                problems.append(f"column {c} has non-numeric values for {_examples(bad.tolist())}")
            df[c] = num.astype("float64")
        boxes = df[list(BBOX_COLUMNS)]
        partial = boxes.isna().any(axis=1) & boxes.notna().any(axis=1)
        if partial.any():
            problems.append(f"{int(partial.sum())} row(s) have a partial bounding box: {_examples(df.loc[partial, 'path'].tolist())}")
    if problems:
        raise ManifestError("invalid manifest:\n  - " + "\n  - ".join(problems))
    return df


@dataclass
class Manifest:
    """A validated manifest table and the folder its paths are relative to.

    Attributes:
        table: the normalised DataFrame (one row per image, columns as in the module docstring).
        root: absolute dataset root folder.
        shards: the shard folder whose records hold the photos (row i: record table.shard_index[i]), or None.
    """

    table: pd.DataFrame
    root: Path
    shards: str | None = None  # a shard folder the photos are read from (data/shards.py), or None: files under root

    @classmethod
    def from_table(cls, table: pd.DataFrame, root: str | os.PathLike) -> "Manifest":
        """Build a manifest from a DataFrame, checking the schema (raises ManifestError)."""
        return cls(normalize_table(table), Path(root).expanduser().resolve())

    def __len__(self) -> int:
        return len(self.table)

    @property
    def has_bboxes(self) -> bool:
        """True when the table has bounding-box columns with at least one box."""
        return all(c in self.table.columns for c in BBOX_COLUMNS) and bool(self.table["bbox_w"].notna().any())

    @property
    def class_names(self) -> list[str]:
        """Sorted names of every class that appears in the manifest (any split)."""
        return sorted(set(self.table["label"]) - {""})

    @property
    def content_hash(self) -> str:
        """sha256 (hex) of the table's schema columns, in row order; independent of file format."""
        cols = list(REQUIRED_COLUMNS) + [c for c in BBOX_COLUMNS if c in self.table.columns]
        text = self.table[cols].to_csv(index=False, lineterminator="\n", float_format="%.4f")
        if self.shards is not None:  # the photos are the shard records: their index's hash and each row's record
            from finegrain.data.shards import shard_info

            text += shard_info(self.shards)["records_hash"] + ",".join(map(str, self.table["shard_index"]))
        return hashlib.sha256(f"finegrain-manifest-v{FORMAT_VERSION}\n{text}".encode()).hexdigest()

    def split_counts(self) -> dict[str, int]:
        """Number of images per split, e.g. {"train": 1452, "test": 1500}."""
        return {s: int(n) for s, n in self.table["split"].value_counts().items()}

    def select(self, splits) -> "Manifest":
        """A manifest with only the rows whose split is in `splits` (a name or a collection)."""
        splits = [splits] if isinstance(splits, str) else list(splits)
        unknown = set(splits) - set(SPLITS)
        if unknown:
            raise ManifestError(f"unknown split(s) {sorted(unknown)}; allowed: {', '.join(SPLITS)}")
        return dataclasses.replace(self, table=self.table[self.table["split"].isin(splits)].reset_index(drop=True))

    def rows(self, split, classes=None) -> "Manifest":
        """The rows of `split` (a name or a list of names, as `select`), in order, same root.

        With `classes` (a collection of class names), only the rows whose label is one of them.
        """
        picked = self.select(split)
        if classes is None:
            return picked
        keep = picked.table["label"].isin(list(classes))
        return dataclasses.replace(picked, table=picked.table[keep].reset_index(drop=True))

    def class_codes(self, classes) -> torch.Tensor:
        """(N,) int64 tensor: each row's label as its index in `classes` (a sequence of names).

        Raises:
            ManifestError: a row's label is not in `classes` (the error names the label and path).
        """
        import torch

        index = {c: i for i, c in enumerate(classes)}
        codes = self.table["label"].astype(str).map(index)
        missing = codes.isna()
        if missing.any():
            row = self.table.loc[missing].iloc[0]
            raise ManifestError(
                f"label {row['label']!r} of {row['path']} (root {self.root}) is not one of the "
                f"{len(index)} classes {_examples(index)} ({int(missing.sum())} row(s) in all)"
            )
        return torch.from_numpy(np.array(codes.to_numpy(dtype=np.int64)))  # a writable copy

    def decode(self, i: int, *, min_side: int | None = None):
        """Row i's photo as a DecodedImage: its file under root, or its shard record. Raises BadImageError."""
        from finegrain.data.images import decode_image

        rel = self.table["path"].iat[i]
        if self.shards is None:
            return decode_image(self.root / rel, min_side=min_side, name=rel)
        from finegrain.data.shards import read_record

        record = int(self.table["shard_index"].iat[i])
        return read_record(self.shards, record, min_side=min_side, name=f"shard record {record} ({rel})")

    def abspath(self, rel: str):
        """Absolute path of a manifest path (no check that it exists or stays under root). For a shard manifest, a
        ShardPhoto: the same text, and `read()` decodes its record (thumbnails in reports use it)."""
        if self.shards is not None:
            from finegrain.data.shards import ShardPhoto

            return ShardPhoto(str(self.root / rel), self, rel)
        return self.root / rel

    # --- files -------------------------------------------------------------------------------
    def _meta(self, out: Path) -> dict:
        try:
            rel_root = os.path.relpath(self.root, out.resolve().parent)
        except ValueError:  # different drive on Windows
            rel_root = str(self.root)
        return {
            "format_version": FORMAT_VERSION,
            "root": Path(rel_root).as_posix(),
            "root_absolute": str(self.root),
            "content_hash": self.content_hash,
            "rows": len(self.table),
        }

    def save(self, path: str | os.PathLike, provenance: dict | None = None) -> Path:
        """Write the manifest atomically as .csv or .parquet (chosen by suffix); returns the path.

        The root is stored relative to the manifest file (and absolute, as a fallback), with the
        content hash: in the Parquet schema metadata, or in the sidecar `NAME.csv.json` of a CSV
        (see `sidecar_path`). The CSV is complete before its sidecar is replaced, and renamed into
        place after it, so a new CSV is never visible without its metadata. `provenance` (JSON-able: where
        the rows came from, e.g. the review a relabel applied) is stored in the metadata too.
        """
        out = Path(path)
        meta = self._meta(out)
        if provenance:
            meta["provenance"] = provenance
        suffix = out.suffix.lower()
        if suffix not in (".csv", ".parquet"):
            raise ManifestError(f"{out}: a manifest file must end in .csv or .parquet")
        with atomic_path(out) as tmp:
            if suffix == ".csv":
                with open(tmp, "w", encoding="utf-8", newline="") as f:
                    self.table.to_csv(f, index=False, lineterminator="\n")
                atomic_write_text(sidecar_path(out), json.dumps(meta, indent=2) + "\n")
            else:
                import pyarrow as pa
                import pyarrow.parquet as pq

                arrow = pa.Table.from_pandas(self.table, preserve_index=False)
                schema_meta = dict(arrow.schema.metadata or {})
                schema_meta[_PARQUET_KEY] = json.dumps(meta).encode()
                pq.write_table(arrow.replace_schema_metadata(schema_meta), tmp)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, root: str | os.PathLike | None = None) -> "Manifest":
        """Read a manifest written by `save` (or a hand-written CSV/Parquet with the schema columns).

        Args:
            path: the .csv or .parquet file (a CSV's metadata comes from its old comment line or
                its sidecar `NAME.csv.json`).
            root: dataset root; overrides the stored one. Without it, the stored root is used
                (relative to the manifest file first, then the stored absolute path), and for a
                file with no stored root, the manifest's own folder.
        """
        from finegrain.data.shards import MANIFEST_FILE, is_remote, local_folder, shard_info

        if is_remote(path):  # a shard folder at a URL: its manifest is fetched, its records streamed
            shard_info(path)
            folder = local_folder(path)
            return dataclasses.replace(cls.load(folder / MANIFEST_FILE, root=folder), shards=path)
        path = Path(path)
        if path.is_dir():
            shard_info(path)  # a shard folder, complete and of this format, or a ShardError saying what is wrong
            return dataclasses.replace(cls.load(path / MANIFEST_FILE, root=path), shards=str(path.resolve()))
        if not path.is_file():
            raise ManifestError(f"manifest file not found: {path}")
        meta: dict = {}
        suffix = path.suffix.lower()
        try:
            if suffix == ".parquet":
                import pyarrow.parquet as pq

                arrow = pq.read_table(path)
                raw = (arrow.schema.metadata or {}).get(_PARQUET_KEY)
                meta = json.loads(raw) if raw else {}
                table = arrow.to_pandas()
            elif suffix in (".csv", ".tsv"):
                table, meta = _read_csv(path)
            else:
                raise ManifestError(f"{path}: unknown manifest format {suffix!r} (use .csv or .parquet)")
        except ManifestError:
            raise
        except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
            raise ManifestError(f"{path}: cannot read manifest ({e})") from None
        if root is None:
            root = cls._stored_root(path, meta)
        try:
            return cls.from_table(table, root)
        except ManifestError as e:
            raise ManifestError(f"{path}: {e}") from None

    @staticmethod
    def _stored_root(path: Path, meta: dict) -> Path:
        base = path.resolve().parent
        if "root" not in meta:
            return base
        relative = (base / meta["root"]).resolve()
        if relative.is_dir():
            return relative
        absolute = Path(meta.get("root_absolute", ""))
        if meta.get("root_absolute") and absolute.is_dir():
            return absolute
        return relative
