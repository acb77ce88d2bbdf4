"""The `finegrain` command line. Each command parses options and calls one library function;
problems with the user's input are printed as one clear message (exit code 2), never a traceback."""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from finegrain.errors import FinegrainError
from finegrain.stages import STAGES

app = typer.Typer(
    no_args_is_help=True,
    help="Fine-grained image classification (birds first): manifests, contrastive pretraining, "
    "supervised contrastive fine-tuning and evaluation of any timm backbone.",
    pretty_exceptions_enable=False,
)
manifest_app = typer.Typer(no_args_is_help=True, help="Create, split and check dataset manifests.")
app.add_typer(manifest_app, name="manifest")

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


class _ConsoleLogHandler(logging.Handler):
    """Library log records to stderr: info plain, warnings yellow, errors red."""

    styles = {logging.WARNING: "yellow", logging.ERROR: "red"}

    def emit(self, record: logging.LogRecord) -> None:
        style = next((s for level, s in sorted(self.styles.items(), reverse=True) if record.levelno >= level), None)
        prefix = f"{record.levelname.lower()}: " if style else ""
        err.print(prefix + record.getMessage(), style=style, markup=False, highlight=False)


def _setup_logging(verbose: bool = False) -> None:
    logger = logging.getLogger("finegrain")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, _ConsoleLogHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleLogHandler())
        logger.propagate = False


# The disk is full, read-only or not ours: the user's machine, not a bug, so no traceback.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def user_errors(fn):
    """Turn FinegrainError into a one-line red message and exit code 2; a full or read-only disk into exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _setup_logging()
        try:
            return fn(*args, **kwargs)
        except FinegrainError as e:
            err.print(f"[bold red]error:[/] {e}", markup=True, highlight=False)
            raise typer.Exit(2) from None
        except OSError as e:
            if e.errno not in _STORAGE_ERRNOS:
                raise
            where = f" {e.filename}" if e.filename else ""
            err.print(f"[bold red]error:[/] could not write{where}: {e.strerror}. Files already written (checkpoint, "
                      "manifests, earlier stages) are complete; free space or fix permissions and rerun "
                      "(training stages: with --resume).", markup=True, highlight=False)
            raise typer.Exit(1) from None

    return wrapper


OutOption = Annotated[Path, typer.Option("--out", "-o", help="Manifest to write: .csv or .parquet.")]


def _report_written(manifest, path: Path) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(manifest.split_counts().items()))
    out.print(f"wrote {path}: {len(manifest)} images, {len(manifest.class_names)} classes ({counts})")


@manifest_app.command("cub")
@user_errors
def manifest_cub(
    root: Annotated[Path, typer.Argument(help="CUB-200-2011 folder (images.txt, classes.txt, ...).")],
    out_path: OutOption,
):
    """Import the CUB-200-2011 layout (or a CUB-style variant).

    Accepts comma or space separators and 0- or 1-based ids, and says which it found.

    Example: finegrain manifest cub ~/data/CUB_200_2011 -o data_manifests/cub200.parquet
    """
    from finegrain.data.importers import import_cub

    manifest = import_cub(root)
    _report_written(manifest, manifest.save(out_path))


@manifest_app.command("folder")
@user_errors
def manifest_folder(
    root: Annotated[Path, typer.Argument(help="ROOT/<class>/* or ROOT/<split>/<class>/* image folders.")],
    out_path: OutOption,
):
    """Import an image folder tree; class (and split) names come from folder names.

    Example: finegrain manifest folder ~/birds -o data_manifests/my_birds.csv
    """
    from finegrain.data.importers import import_folder

    manifest = import_folder(root)
    _report_written(manifest, manifest.save(out_path))


@manifest_app.command("csv")
@user_errors
def manifest_csv(
    file: Annotated[Path, typer.Argument(help="Your list of images: .csv, .tsv or .parquet.")],
    out_path: OutOption,
    path_col: Annotated[str, typer.Option(help="Column with image paths.")] = "path",
    label_col: Annotated[Optional[str], typer.Option(help="Column with class names (empty = unlabeled).")] = None,
    split_col: Annotated[Optional[str], typer.Option(help="Column with train/val/test/unlabeled.")] = None,
    id_col: Annotated[Optional[str], typer.Option(help="Column with unique ids (default: the path).")] = None,
    bbox_cols: Annotated[Optional[str], typer.Option(help="Four comma-separated columns: x,y,w,h in pixels.")] = None,
    root: Annotated[Optional[Path], typer.Option(help="Folder that relative paths start from (default: the table's folder).")] = None,
):
    """Import your own table of images.

    Example: finegrain manifest csv photos.csv --path-col file --label-col species -o my_birds.parquet
    """
    from finegrain.data.importers import import_table

    cols = None
    if bbox_cols:
        cols = tuple(c.strip() for c in bbox_cols.split(","))
        if len(cols) != 4:
            raise FinegrainError(f"--bbox-cols needs four column names (x,y,w,h), got {bbox_cols!r}")
    manifest = import_table(file, path_col=path_col, label_col=label_col, split_col=split_col, id_col=id_col, bbox_cols=cols, root=root)
    _report_written(manifest, manifest.save(out_path))


@manifest_app.command("split")
@user_errors
def manifest_split(
    manifest_path: Annotated[Path, typer.Argument(metavar="MANIFEST", help="Manifest to split.")],
    out_path: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write (default: overwrite MANIFEST).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(
        help="Fraction of each class's train images moved to val (default 0.1, or 0 with --label-fraction).")] = None,
    test_fraction: Annotated[float, typer.Option(help="Fraction moved to test (for data without a test split).")] = 0.0,
    label_fraction: Annotated[Optional[float], typer.Option(
        help="Keep labels on this stratified fraction of each class's train images (at least one a class); "
             "the rest become 'unlabeled' (pretrain uses them, supcon and the linear probe do not).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
):
    """Hold out a stratified val (and optionally test) split from train; every class keeps a train image.
    With --label-fraction, also drop the labels of all but a fraction of the train images.

    Examples:
      finegrain manifest split data_manifests/cub50.parquet --val-fraction 0.1 --seed 0 -o cub50_val.parquet
      finegrain manifest split data_manifests/cub50.csv --label-fraction 0.1 --seed 0 -o cub50_10pct.csv
    """
    from finegrain.data.manifest import Manifest
    from finegrain.data.split import keep_label_fraction, split_manifest

    if val_fraction is None:
        val_fraction = 0.0 if label_fraction is not None else 0.1
    manifest = Manifest.load(manifest_path)
    if val_fraction > 0 or test_fraction > 0:
        manifest = split_manifest(manifest, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    if label_fraction is not None:
        manifest = keep_label_fraction(manifest, label_fraction, seed=seed)
    _report_written(manifest, manifest.save(out_path or manifest_path))


@manifest_app.command("relabel")
@user_errors
def manifest_relabel(
    manifest_path: Annotated[Path, typer.Argument(metavar="MANIFEST", help="The manifest the audit was made on.")],
    audit_csv: Annotated[Path, typer.Option("--from", help="audit.csv written by `finegrain audit`.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the corrected manifest.")],
    accept: Annotated[Optional[list[str]], typer.Option(
        help="A finding's rank to apply (repeat), or 'all'. Default: the rows whose 'accept' column you filled with yes.")] = None,
):
    """Apply the audit findings you agree with to a new manifest: a label error takes its suggested label;
    a near-duplicate or an outlier is left out. The original manifest is not changed.

    Examples:
      finegrain manifest relabel mine.csv --from runs/audit/audit.csv --accept 1 --accept 4 -o mine_fixed.csv
      finegrain manifest relabel mine.csv --from runs/audit/audit.csv -o mine_fixed.csv   # 'accept' column filled in
    """
    import pandas as pd

    from finegrain.data.manifest import Manifest
    from finegrain.data.relabel import accepted_findings, apply_findings

    if not audit_csv.is_file():
        raise FinegrainError(f"no such audit file: {audit_csv}")
    findings = accepted_findings(pd.read_csv(audit_csv, keep_default_na=False), accept or [], str(audit_csv))
    fixed, counts = apply_findings(Manifest.load(manifest_path), findings)
    out.print(f"{counts['relabelled']} photos relabelled, {counts['dropped']} left out")
    _report_written(fixed, fixed.save(out_path))


@manifest_app.command("shard")
@user_errors
def manifest_shard(
    manifest_path: Annotated[Path, typer.Argument(metavar="MANIFEST", help="The manifest whose photos to write.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="A new or empty folder for the shards.")],
    max_side: Annotated[int, typer.Option(min=8, help="Photos are resized so their shorter side is at most this "
                                                      "(px), then stored as JPEG.")] = 512,
    shard_size: Annotated[str, typer.Option(help="Target size of one shard, e.g. 64MB, 256MB, 1GB.")] = "256MB",
    workers: Annotated[Optional[int], typer.Option(min=1, help="Decoding threads (default: CPU count).")] = None,
):
    """Write a manifest's photos into shards (litdata): decoded once, resized, re-encoded, with label, split,
    box and row. Every command that takes --manifest takes the shard folder too, with the same splits and labels.

    Examples:
      finegrain manifest shard data_manifests/cub50.csv -o shards/cub50
      finegrain supcon --manifest shards/cub50 -o runs/supcon      # the folder where a manifest file went
      finegrain manifest shard big.parquet -o /data/shards/big --max-side 384 --shard-size 1GB
    """
    from finegrain.data.manifest import Manifest
    from finegrain.data.shards import write_shards

    info = write_shards(Manifest.load(manifest_path), out_dir, max_side=max_side, shard_bytes=shard_size,
                        workers=workers)
    bad = f", {info['bad_records']} unreadable photo(s) written as empty records" if info["bad_records"] else ""
    out.print(f"wrote {out_dir}: {info['records']} photos in {info['shards']} shard(s), "
              f"{info['bytes'] / 2**20:.1f} MB{bad}")


@manifest_app.command("validate")
@user_errors
def manifest_validate(
    manifest_path: Annotated[Path, typer.Argument(metavar="MANIFEST", help="Manifest to check.")],
    root: Annotated[Optional[Path], typer.Option(help="Dataset root (overrides the one stored in the manifest).")] = None,
    allow_unseen_classes: Annotated[bool, typer.Option(help="Classes with no training images are warnings (zero-shot retrieval).")] = False,
    show_classes: Annotated[bool, typer.Option(help="Print the image count of every class.")] = False,
):
    """Check every file and row of a manifest before training on it.

    Finds missing, undecodable or duplicated images, train/test overlap, classes without
    training images, paths leaving the root and boxes outside the image.

    Exit code 1 when there are errors; warnings are listed but do not fail.

    Example: finegrain manifest validate data_manifests/cub50.parquet
    """
    from finegrain.data.manifest import Manifest
    from finegrain.data.validate import validate_manifest

    manifest = Manifest.load(manifest_path, root=root)
    report = validate_manifest(manifest, allow_unseen_classes=allow_unseen_classes, progress=sys.stderr.isatty())
    for p in report.errors:
        out.print(f"[red]error[/]   [{p.kind}] {p}", highlight=False)
    for p in report.warnings:
        out.print(f"[yellow]warning[/] [{p.kind}] {p}", highlight=False)
    counts = report.class_counts
    if len(counts):
        total = counts.sum(axis=1)
        out.print(
            f"classes: {len(counts)}; images per class min {int(total.min())}, "
            f"median {float(total.median()):g}, max {int(total.max())}"
        )
        if show_classes:
            table = Table("class", *counts.columns, title="images per class")
            for name, row in counts.iterrows():
                table.add_row(str(name), *(str(int(v)) for v in row))
            out.print(table)
    splits = ", ".join(f"{k} {v}" for k, v in sorted(manifest.split_counts().items()))
    verdict = "[green]OK[/]" if report.ok else "[red]FAILED[/]"
    out.print(f"{verdict} {manifest_path} (root {manifest.root}): {report.summary()}; {splits}")
    if not report.ok:
        raise typer.Exit(1)


@app.command("demo-data")
@user_errors
def demo_data(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Folder to write images and manifest.csv to.")],
    classes: Annotated[int, typer.Option(help="Number of species (2-72).")] = 12,
    per_class: Annotated[int, typer.Option(help="Images per species.")] = 40,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    test_fraction: Annotated[float, typer.Option(help="Fraction of each species in the test split.")] = 0.25,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
):
    """Draw a synthetic fine-grained bird dataset and write its manifest to OUT_DIR/manifest.csv.

    Species differ only in bill length, crown colour, wing bar, eye ring and breast pattern;
    pose, scale, plumage, background and lighting vary freely.

    Example: finegrain demo-data demo/birds --classes 12 --per-class 40
    """
    from finegrain.data.synthetic import make_demo_dataset

    manifest = make_demo_dataset(out_dir, classes=classes, per_class=per_class, image_size=image_size, test_fraction=test_fraction, seed=seed)
    _report_written(manifest, Path(out_dir) / "manifest.csv")


# --- training stages: options generated from the config dataclasses --------------------------

def _option_help(f) -> str:
    """A field's help text, with its choices (from the registry or the fixed list) appended."""
    from finegrain.registry import Registry

    text, choices = f.metadata.get("help", ""), f.metadata.get("choices")
    if isinstance(choices, Registry):
        return f"{text} {choices.describe()}."
    if choices is not None and "," not in text:
        return f"{text} One of: {', '.join(choices)}."
    return text


def _stage_command(name: str, config_cls, run, doc: str, arguments: dict[str, str] | None = None):
    """Register a command whose options are the fields of `config_cls` and which calls `run(config)`.

    `arguments`: field name -> metavar of fields given as required positional arguments instead."""
    import dataclasses
    import inspect
    import typing

    hints = typing.get_type_hints(config_cls)
    params = [inspect.Parameter(field_name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                annotation=Annotated[str, typer.Argument(metavar=metavar, help=_option_help(
                                    next(f for f in dataclasses.fields(config_cls) if f.name == field_name)))])
              for field_name, metavar in (arguments or {}).items()]
    for f in dataclasses.fields(config_cls):
        if f.name in (arguments or {}):
            continue
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        decls = [flag, "-o"] if f.name == "out" else [f"{flag}/--no-{flag[2:]}"] if hint is bool else [flag]
        if f.name in ("manifest", "out"):
            default = ...
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[hint, typer.Option(*decls, help=_option_help(f))], default=default))

    flags = {f.name: f.metadata.get("flag") or "--" + f.name.replace("_", "-") for f in dataclasses.fields(config_cls)}

    def command(**kwargs):
        from finegrain.config import ConfigError

        try:
            config = config_cls(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()})
        except ConfigError as e:  # name the flag the user typed, not the field
            raise FinegrainError(f"{flags.get(e.key, e.key)}{str(e)[len(e.key):]}") from None
        run(config)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = doc
    command.__name__ = name.replace("-", "_")
    app.command(name)(user_errors(command))


def _run_pretrain(config) -> None:
    artifact = STAGES["pretrain"].run(config)
    if artifact is not None:
        out.print(f"artifact: {artifact.path}")


def _run_supcon(config) -> None:
    artifact = STAGES["supcon"].run(config)
    if artifact is not None:
        out.print(f"artifact: {artifact.path}")


def _run_evaluate(config) -> None:
    artifact = STAGES["evaluate"].run(config)
    if artifact is not None:
        metrics = artifact.info["metrics"]
        keys = ("knn_top1", "linear_top1", "recall_at_1", "map_at_r", "open_set_auroc")
        headline = ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if metrics.get(k) is not None)
        out.print(f"report: {artifact.path / 'report' / 'index.html'}\n{headline}")


def _run_audit(config) -> None:
    table = STAGES["audit"].run(config)
    counts = table["issue"].value_counts().to_dict()
    out.print(f"wrote {Path(config.out) / 'audit.csv'} and audit.html: {counts.get('label', 0)} probable label errors, "
              f"{counts.get('duplicate', 0)} near-duplicates, {counts.get('outlier', 0)} outliers")


def _run_suggest(config) -> None:
    table = STAGES["suggest"].run(config)
    html = Path(config.out).with_suffix(".html")
    out.print(f"wrote {config.out}: {len(table)} photos to label next, in order; contact sheet {html}")


def _register_stages() -> None:
    from finegrain.registry import PRETRAIN_METHODS, SUPCON_LOSSES

    _stage_command("pretrain", STAGES["pretrain"].config, _run_pretrain, f"""Self-supervised pretraining of any timm backbone (--method: {", ".join(PRETRAIN_METHODS.names())}).

    Labels are ignored: every train and unlabeled image is used. Writes an artifact folder that `supcon` and `evaluate` start from. Scale out with torchrun.

    Example: finegrain pretrain --manifest data_manifests/cub50.csv --out runs/pretrain --method moco --image-size 128 --epochs 20

    Example (2 GPUs): torchrun --nproc_per_node 2 -m finegrain pretrain --manifest M --out runs/p
    """)
    _stage_command("supcon", STAGES["supcon"].config, _run_supcon, f"""Supervised fine-tuning on the labelled train images (--loss: {", ".join(SUPCON_LOSSES.names())}).

    Starts from a pretrain artifact (--from) or backbone weights. Defaults are a gentle recipe for small fine-grained sets: frozen BatchNorm, backbone at 0.1x the head's rate, one head-only epoch, crop + flip views, 16 x 4 class-balanced batches. Afterwards a linear classifier is fitted on the embedding, so `finegrain predict` can name species.

    Example: finegrain supcon --manifest data_manifests/cub50.csv --from runs/pretrain --out runs/supcon --image-size 128 --epochs 10

    Example (baseline): finegrain supcon --manifest M --out runs/ce --loss ce

    Example (few labels, many unlabeled photos; a teacher that keeps the ImageNet features, then its student): finegrain supcon --manifest M --out runs/probe --backbone-lr-scale 0 --max-steps 20 && finegrain supcon --manifest M --out runs/student --teacher runs/probe
    """)
    _stage_command("evaluate", STAGES["evaluate"].config, _run_evaluate, """Evaluate an artifact or a bare backbone: kNN, linear probe, retrieval, per-class results, plots.

    Features are extracted with the artifact's own image size and normalisation and cached in a folder shared with audit and suggest (--features-dir), so re-running is quick. Writes report/index.html, report/metrics.json, per-class CSV and PNG plots.

    Example: finegrain evaluate --manifest data_manifests/cub50.csv --from runs/supcon --out runs/eval

    Example (frozen ImageNet weights): finegrain evaluate --manifest M --backbone tf_efficientnet_lite0 --image-size 128 --out runs/eval-frozen

    Example (with the audit's flagged counts and a link to its page in the report): finegrain evaluate --manifest M --from runs/supcon --out runs/eval --audit runs/audit
    """)
    _stage_command("audit", STAGES["audit"].config, _run_audit, """Photos worth a second look: probable label errors, near-duplicates and outliers, from an artifact's embeddings.

    Label errors come from confident learning (cleanlab) on out-of-sample class probabilities of the labelled photos (a cross-validated linear probe, or --label-probs knn); near-duplicates and outliers are checked across every photo, labelled or not. Writes OUT/audit.csv (ranked: rank, issue, path, split, given and suggested label, score, reason) and OUT/audit.html (each photo beside typical photos of its given and suggested species). Nothing is changed: apply what you agree with using `finegrain manifest relabel`.

    Example: finegrain audit runs/supcon --manifest data_manifests/mine.csv -o runs/audit

    Then: finegrain manifest relabel data_manifests/mine.csv --from runs/audit/audit.csv --accept 1 --accept 4 -o data_manifests/mine_fixed.csv

    The evaluate report shows the flagged counts and links to audit.html with `finegrain evaluate ... --audit runs/audit`.
    """, arguments={"from_artifact": "ARTIFACT_DIR"})
    _stage_command("suggest", STAGES["suggest"].config, _run_suggest, """Which unlabelled photos to label next: a ranked CSV and a contact sheet of thumbnails.

    Candidates are the manifest's 'unlabeled' rows; its train rows are what is labelled already. Photos are compared by the --from artifact's features (cached in --features-dir). With few or no labels the picks are typical photos of distinct unlabelled clusters (TypiClust); once every species has a couple of labels, photos a classifier on the labels is unsure about, spread over the embedding (--strategy auto). Writes OUT.csv (rank, image_id, path, reason, score, represents: how many unlabelled photos the pick stands for, best_guess from a supcon artifact's classifier) and OUT.html beside it. Label the photos (give them a label and split train in the manifest) and run again for the next batch.

    Example: finegrain suggest --manifest data_manifests/my_birds.csv --from runs/supcon --budget 50 -o runs/next50.csv
    """)


_register_stages()


@app.command("predict")
@user_errors
def predict(
    artifact: Annotated[Path, typer.Argument(metavar="ARTIFACT_DIR", help="A supcon artifact (it holds a classifier).")],
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE_OR_FOLDER...", help="Photos, or folders searched recursively.")],
    top_k: Annotated[int, typer.Option(help="Species to list per photo.")] = 5,
    out_csv: Annotated[Optional[Path], typer.Option("--out", "-o", help="CSV to write (default: print a table).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 64,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 2,
    flip_tta: Annotated[Optional[bool], typer.Option("--flip-tta/--no-flip-tta", help="Average each photo's features with its mirror image's (default: as the classifier was fitted).")] = None,
    open_set: Annotated[Optional[str], typer.Option("--open-set", metavar="on|off", help="Name photos unlike every trained species 'unknown' (default: on when the artifact stores a calibration, as supcon artifacts do; off for older ones).")] = None,
):
    """Name the species in new photos with a trained artifact's embedding and classifier.

    Writes one row per photo: path, pred_1..pred_K, score_1..score_K (probabilities) and an error
    for files that cannot be read.

    With --open-set on (the default for supcon artifacts that store it), also: unknown_score (distance
    to the k-th nearest training photo, 0-2; larger = less like any trained species), known (false when
    unknown_score is past the threshold calibrated to accept 95% of known-species photos) and
    nearest_species (the classifier's best species). pred_1 is 'unknown' for photos not known; pred_2..
    and score_1.. stay the classifier's ranking (score_1 is nearest_species' probability). --open-set off
    writes only the columns above.

    Example: finegrain predict runs/supcon ~/photos/garden --top-k 5 -o preds.csv
    """
    from finegrain.stages.predict import run_predict

    if open_set not in (None, "on", "off"):
        raise FinegrainError(f"--open-set must be on or off, got {open_set!r}")
    df = run_predict(artifact, images, top_k=top_k, out_csv=out_csv, device=device, batch_size=batch_size, workers=workers,
                     flip_tta=flip_tta, open_set=None if open_set is None else open_set == "on")
    if out_csv:
        out.print(f"wrote {out_csv}: {len(df)} photos")
        return
    table = Table("photo", "prediction", "score", "next")
    for row in df.itertuples(index=False):
        r = row._asdict()
        if r.get("error"):
            table.add_row(Path(r["path"]).name, "[red]unreadable[/]", "", str(r["error"]))
        else:
            nxt = ", ".join(f"{r[f'pred_{j}']} {r[f'score_{j}']:.2f}" for j in range(2, top_k + 1) if f"pred_{j}" in r)
            named = str(r["pred_1"])
            if "known" in r and not r["known"]:
                named = f"[yellow]unknown[/] (nearest: {escape(str(r['nearest_species']))}, score {r['unknown_score']:.3f})"
            table.add_row(Path(r["path"]).name, named, f"{r['score_1']:.3f}", nxt)
    out.print(table)


@app.command("run")
@user_errors
def run(
    pipeline: Annotated[Path, typer.Argument(metavar="PIPELINE.yaml", help="Pipeline file (see pipelines/).")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override an option: stage.key=value, defaults.key=value, data.split.seed=1 (repeatable).")] = None,
    force: Annotated[Optional[list[str]], typer.Option(help="Rerun this stage even if cached (repeatable).")] = None,
):
    """Run a pipeline: data, then pretrain -> supcon -> evaluate, each from the previous artifact.

    A stage whose inputs (manifest content, parent artifact, resolved options) are unchanged is
    reused from its folder; an interrupted stage resumes from its checkpoint.

    Example: finegrain run pipelines/demo.yaml

    Example: finegrain run pipelines/cub200.yaml --set supcon.epochs=30 --set defaults.device=cuda
    """
    from finegrain.pipeline import load_pipeline, run_pipeline

    spec = load_pipeline(pipeline, set_ or [])
    results = run_pipeline(spec, force=force or [])
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 speaks for the run
        return
    table = Table("stage", "status", "folder", "headline")
    for r in results:
        m = r.info.get("metrics") or {}
        keys = ("knn_top1", "linear_top1", "recall_at_1", "map_at_r") if r.stage == "evaluate" else ("final_loss", "steps")
        table.add_row(r.stage, r.status, str(r.path), ", ".join(f"{k} {m[k]:.4g}" for k in keys if m.get(k) is not None))
    out.print(table)
    last = results[-1]
    if last.stage == "evaluate":
        _print_comparison(last.path / "report" / "metrics.json")
        out.print(f"report: {last.path / 'report' / 'index.html'}")
    if spec.get("next"):
        out.print("\n[bold]Next, on your own photos:[/]")
        for command in spec["next"]:
            out.print(f"  {escape(command)}", soft_wrap=True)


def _print_comparison(metrics_file: Path) -> None:
    """What the last evaluation was compared with (chance, the frozen start, earlier stages), on one screen."""
    metrics = json.loads(metrics_file.read_text())
    if metrics.get("chance") is None:
        return
    table = Table("on the same test photos", "kNN top-1", "linear probe top-1", title="Compared with")
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    table.add_row("chance", pct(metrics["chance"]), pct(metrics["chance"]))
    for name, b in (metrics.get("baselines") or {}).items():
        table.add_row("frozen start" if name == "frozen" else name, pct(b.get("knn_top1")), pct(b.get("linear_top1")))
    table.add_row("[bold]this model[/]", pct(metrics.get("knn_top1")), pct(metrics.get("linear_top1")))
    out.print(table)


@app.command("runs")
@user_errors
def runs(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Folder to search for artifacts.")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the tree as JSON (for scripts).")] = False,
):
    """Show the artifacts under DIR as lineage trees (each artifact under the one it was made from), with
    stage, method and headline metrics.

    Example: finegrain runs demo/runs

    Example: finegrain runs runs/ --json | jq '.[0].children[0].metrics'
    """
    from rich.tree import Tree

    from finegrain.pipeline import list_runs, runs_tree

    roots = runs_tree(list_runs(folder))
    if as_json:
        typer.echo(json.dumps(roots, indent=2, default=str))
        return
    if not roots:
        out.print(f"no artifacts under {folder}")
        return
    top = Tree(f"[bold]{escape(str(folder))}[/]")

    def add(branch, node):
        shown = ", ".join(f"{k} {v:.3f}" for k, v in node["metrics"].items())
        what = f"[bold]{node['stage']}[/]" + (f" {escape(str(node['method']))}" if node["method"] else "")
        child = branch.add(f"{what}  {escape(node['path'])}" + (f"\n[green]{shown}[/]" if shown else ""))
        for c in node["children"]:
            add(child, c)

    for root in roots:
        add(top, root)
    out.print(top)


@app.command("backbones")
@user_errors
def backbones():
    """List the backbones that have built-in offline weights (no download needed).

    Any other timm model works with --weights FILE or --pretrained (download).

    Example: finegrain backbones
    """
    from finegrain.models.backbone import offline_backbones

    table = Table("backbone", "embedding", "weights from", "installed")
    for row in offline_backbones():
        table.add_row(str(row.get("name")), str(row.get("embedding_dim", row.get("embedding_size", "?"))),
                      str(row.get("source", row.get("package", ""))), "yes" if row.get("installed") else "no")
    out.print(table)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
