"""The manifest commands and demo-data: one checked config each (its fields are the command's options) and a
`run_*` function that does the work and returns what the command prints. Imports no pandas or torch: the
work's modules are imported when it runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finegrain.config import FRACTION_ABOVE_0, FRACTION_BELOW_1, CommandConfig, ConfigError, at_least, between, option
from finegrain.errors import FinegrainError

MANIFEST_OUT = "Manifest to write: .csv or .parquet."
DEMO_SPECIES = 72  # len(finegrain.data.synthetic.ALL_SPECIES): this module imports no numpy


def _written(manifest, path: Path) -> str:
    """'wrote PATH: N images, C classes (split counts)'."""
    counts = ", ".join(f"{k} {v}" for k, v in sorted(manifest.split_counts().items()))
    return f"wrote {path}: {len(manifest)} images, {len(manifest.class_names)} classes ({counts})"


@dataclass
class ImportConfig(CommandConfig):
    """What every import writes: the manifest file."""

    out: Path = option(help=MANIFEST_OUT, flag="--out")

    def save(self, manifest) -> str:
        """Write `manifest` to --out; returns what the command prints."""
        return _written(manifest, manifest.save(self.out))


@dataclass
class ManifestCubConfig(ImportConfig):
    """`finegrain manifest cub`: import the CUB-200-2011 layout."""

    root: Path = option(help="CUB-200-2011 folder (images.txt, classes.txt, ...).")


def run_manifest_cub(config: ManifestCubConfig) -> str:
    from finegrain.data.importers import import_cub

    return config.save(import_cub(config.root))


@dataclass
class ManifestFolderConfig(ImportConfig):
    """`finegrain manifest folder`: import ROOT/<class>/* or ROOT/<split>/<class>/* folders."""

    root: Path = option(help="ROOT/<class>/* or ROOT/<split>/<class>/* image folders.")


def run_manifest_folder(config: ManifestFolderConfig) -> str:
    from finegrain.data.importers import import_folder

    return config.save(import_folder(config.root))


@dataclass
class ManifestCsvConfig(ImportConfig):
    """`finegrain manifest csv`: import a table of images (column names; boxes in pixels)."""

    file: Path = option(help="Your list of images: .csv, .tsv or .parquet.")
    path_col: str = option("path", "Column with image paths.")
    label_col: str | None = option(None, "Column with class names (empty = unlabeled).")
    split_col: str | None = option(None, "Column with train/val/test/unlabeled.")
    id_col: str | None = option(None, "Column with unique ids (default: the path).")
    bbox_cols: str | None = option(None, "Four comma-separated columns: x,y,w,h in pixels.")
    root: Path | None = option(None, "Folder that relative paths start from (default: the table's folder).")

    def check(self) -> None:
        if self.bbox_cols is not None and len(self.bbox_columns) != 4:
            raise ConfigError("bbox_cols", f"needs four column names (x,y,w,h), got {self.bbox_cols!r}")

    @property
    def bbox_columns(self) -> tuple[str, ...] | None:
        """--bbox-cols as (x, y, w, h) column names, or None."""
        return None if self.bbox_cols is None else tuple(c.strip() for c in self.bbox_cols.split(","))


def run_manifest_csv(config: ManifestCsvConfig) -> str:
    from finegrain.data.importers import import_table

    return config.save(import_table(config.file, path_col=config.path_col, label_col=config.label_col,
                                    split_col=config.split_col, id_col=config.id_col, bbox_cols=config.bbox_columns,
                                    root=config.root))


@dataclass
class ManifestSplitConfig(CommandConfig):
    """`finegrain manifest split`: hold out val/test from train, or keep the labels of a fraction of it."""

    manifest: Path = option(help="Manifest to split.")
    out: Path | None = option(None, "Where to write (default: overwrite MANIFEST).", flag="--out")
    val_fraction: float | None = option(None, "Fraction of each class's train images moved to val (default 0.1, or 0 "
                                              "with --label-fraction).", check=FRACTION_BELOW_1)
    test_fraction: float = option(0.0, "Fraction moved to test (for data without a test split).",
                                  check=FRACTION_BELOW_1)
    label_fraction: float | None = option(None, "Keep labels on this stratified fraction of each class's train images "
                                                "(at least one a class); the rest become 'unlabeled' (pretrain uses "
                                                "them, supcon and the linear probe do not).",
                                          check=FRACTION_ABOVE_0)
    seed: int = option(0, "Random seed.")

    def check(self) -> None:
        if self.val_fraction is None:
            self.val_fraction = 0.0 if self.label_fraction is not None else 0.1
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("test_fraction", f"val_fraction + test_fraction must be below 1 (train keeps the rest), "
                                               f"got {self.val_fraction:g} + {self.test_fraction:g}")


def run_manifest_split(config: ManifestSplitConfig) -> str:
    from finegrain.data.manifest import Manifest
    from finegrain.data.split import keep_label_fraction, split_manifest

    manifest = Manifest.load(config.manifest)
    if config.val_fraction > 0 or config.test_fraction > 0:
        manifest = split_manifest(manifest, val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                                  seed=config.seed)
    if config.label_fraction is not None:
        manifest = keep_label_fraction(manifest, config.label_fraction, seed=config.seed)
    return _written(manifest, manifest.save(config.out or config.manifest))


@dataclass
class ManifestRelabelConfig(CommandConfig):
    """`finegrain manifest relabel`: apply accepted audit findings, or a review's decisions, to a new manifest."""

    manifest: Path = option(help="The manifest the audit or review was made on.")
    source: Path = option(help="audit.csv (or its folder) written by `finegrain audit`, or a REVIEW_DIR written by "
                               "`finegrain review`.", flag="--from", metavar="AUDIT|REVIEW_DIR")
    out: Path = option(help="Where to write the new manifest.", flag="--out")
    accept: list[str] = option(help="An audit finding's rank to apply (repeat), or 'all'. Default: the rows whose "
                                    "'accept' column you filled with yes. Not with a review folder.",
                               default_factory=list)


def _review_folder(source: Path) -> bool:
    from finegrain.data.decisions import DECISIONS_FILE

    return source.is_dir() and (source / DECISIONS_FILE).is_file()


def run_manifest_relabel(config: ManifestRelabelConfig) -> str:
    import pandas as pd

    from finegrain.data.manifest import Manifest
    from finegrain.data.relabel import accepted_findings, apply_findings

    if _review_folder(config.source):
        return _relabel_from_review(config)
    audit_csv = config.source / "audit.csv" if config.source.is_dir() else config.source
    if not audit_csv.is_file():
        raise FinegrainError(f"no such audit file or review folder: {config.source}")
    audit = pd.read_csv(audit_csv, keep_default_na=False)
    findings = accepted_findings(audit, config.accept, str(audit_csv))
    fixed, counts = apply_findings(Manifest.load(config.manifest), findings)
    return (f"{counts['relabelled']} photos relabelled, {counts['dropped']} left out\n"
            + _written(fixed, fixed.save(config.out)))


def _relabel_from_review(config: ManifestRelabelConfig) -> str:
    """The review's decisions in force applied to the manifest; its sources and times in the new sidecar."""
    from finegrain.data.decisions import DecisionLog
    from finegrain.data.manifest import Manifest
    from finegrain.data.relabel import apply_decisions

    if config.accept:
        raise FinegrainError("--accept picks audit findings; a review folder's decisions are applied as made")
    if Path(config.out).resolve() == Path(config.manifest).resolve():
        raise FinegrainError(f"--out {config.out} is the manifest itself: write the new one beside it")
    log = DecisionLog(config.source, create=False)
    try:
        decisions, meta = log.in_force(), log.meta()
    finally:
        log.close()
    manifest = Manifest.load(config.manifest)
    fixed, counts = apply_decisions(manifest, decisions, str(config.source))
    provenance = {"relabelled_from": "review", "review_dir": str(Path(config.source).resolve()),
                  "decisions": len(decisions), "first_decision": decisions[0].at if decisions else None,
                  "last_decision": decisions[-1].at if decisions else None, **meta,
                  "parent_manifest": str(Path(config.manifest).resolve()),
                  "parent_content_hash": manifest.content_hash, "counts": counts}
    return (f"{counts['relabelled']} relabelled, {counts['labelled']} newly labelled, {counts['added']} added, "
            f"{counts['confirmed']} confirmed, {counts['dropped']} left out\n"
            + _written(fixed, fixed.save(config.out, provenance=provenance)))


LABEL_FORMATS = ("label-studio",)


@dataclass
class ManifestImportLabelsConfig(CommandConfig):
    """`finegrain manifest import-labels`: labels made in another tool, applied to a new manifest."""

    manifest: Path = option(help="The manifest the labelling tasks were made from.")
    export: Path = option(help="The tool's export: for label-studio, its JSON export of the project.")
    out: Path = option(help="Where to write the new manifest.", flag="--out")
    format: str = option("label-studio", "Format of the export.", choices=LABEL_FORMATS)


def run_manifest_import_labels(config: ManifestImportLabelsConfig) -> str:
    import hashlib

    from finegrain.data.label_studio import export_decisions, read_export
    from finegrain.data.manifest import Manifest
    from finegrain.data.relabel import apply_decisions

    if Path(config.out).resolve() == Path(config.manifest).resolve():
        raise FinegrainError(f"--out {config.out} is the manifest itself: write the new one beside it")
    manifest = Manifest.load(config.manifest)
    decisions = export_decisions(manifest, read_export(config.export), str(config.export))
    fixed, counts = apply_decisions(manifest, decisions, str(config.export))
    provenance = {"relabelled_from": config.format, "export": str(Path(config.export).resolve()),
                  "export_sha256": hashlib.sha256(Path(config.export).read_bytes()).hexdigest(),
                  "labels": len(decisions), "parent_manifest": str(Path(config.manifest).resolve()),
                  "parent_content_hash": manifest.content_hash, "counts": counts}
    return (f"{len(decisions)} labelled tasks: {counts['relabelled']} relabelled, {counts['labelled']} newly labelled, "
            f"{counts['confirmed']} confirmed, {counts['dropped']} left out\n"
            + _written(fixed, fixed.save(config.out, provenance=provenance)))


@dataclass
class ManifestShardConfig(CommandConfig):
    """`finegrain manifest shard`: write a manifest's photos into litdata shards (sizes in px and bytes)."""

    manifest: Path = option(help="The manifest whose photos to write.")
    out: Path = option(help="A new or empty folder for the shards.", flag="--out")
    max_side: int = option(512, "Photos are resized so their shorter side is at most this (px), then stored as "
                                "JPEG.", check=at_least(8))
    shard_size: str = option("256MB", "Target size of one shard, e.g. 64MB, 256MB, 1GB.")
    workers: int | None = option(None, "Decoding threads (default: CPU count).", check=at_least(1))


def run_manifest_shard(config: ManifestShardConfig) -> str:
    from finegrain.data.manifest import Manifest
    from finegrain.data.shards import write_shards

    info = write_shards(Manifest.load(config.manifest), config.out, max_side=config.max_side,
                        shard_bytes=config.shard_size, workers=config.workers)
    bad = f", {info['bad_records']} unreadable photo(s) written as empty records" if info["bad_records"] else ""
    return (f"wrote {config.out}: {info['records']} photos in {info['shards']} shard(s), "
            f"{info['bytes'] / 2**20:.1f} MB{bad}")


@dataclass
class ManifestValidateConfig(CommandConfig):
    """`finegrain manifest validate`: check every file and row of a manifest."""

    manifest: Path = option(help="Manifest to check.")
    root: Path | None = option(None, "Dataset root (overrides the one stored in the manifest).")
    allow_unseen_classes: bool = option(False, "Classes with no training images are warnings (zero-shot retrieval).")
    show_classes: bool = option(False, "Print the image count of every class.")


def run_manifest_validate(config: ManifestValidateConfig, progress: bool = False):
    """(manifest, its ValidationReport); the command prints the report and exits 1 when it has errors."""
    from finegrain.data.manifest import Manifest
    from finegrain.data.validate import validate_manifest

    manifest = Manifest.load(config.manifest, root=config.root)
    return manifest, validate_manifest(manifest, allow_unseen_classes=config.allow_unseen_classes, progress=progress)


@dataclass
class DemoDataConfig(CommandConfig):
    """`finegrain demo-data`: draw synthetic birds (image side in px) and write their manifest."""

    out_dir: Path = option(help="Folder to write images and manifest.csv to.")
    classes: int = option(12, f"Number of species (2-{DEMO_SPECIES}).", check=between(2, DEMO_SPECIES))
    per_class: int = option(40, "Images per species.", check=at_least(2))
    image_size: int = option(128, "Image side in pixels.", check=at_least(32))
    test_fraction: float = option(0.25, "Fraction of each species in the test split.", check=between(0, 1))
    seed: int = option(0, "Random seed.")


def run_demo_data(config: DemoDataConfig) -> str:
    from finegrain.data.synthetic import make_demo_dataset

    manifest = make_demo_dataset(config.out_dir, classes=config.classes, per_class=config.per_class,
                                 image_size=config.image_size, test_fraction=config.test_fraction, seed=config.seed)
    return _written(manifest, config.out_dir / "manifest.csv")
