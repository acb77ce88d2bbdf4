"""The `finegrain` command line. Every command is declared one way (`_command`): its options are the fields of a
checked config dataclass (finegrain.config, finegrain.data.commands); it builds the config and calls one library
function. Problems with the user's input are printed as one clear message (exit code 2), never a traceback."""

from __future__ import annotations

import dataclasses
import errno
import functools
import inspect
import json
import logging
import os
import re
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from finegrain.config import BackbonesConfig, ConfigError, ExportConfig, PredictConfig, RunConfig, RunsConfig
from finegrain.data import commands as data_commands
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


# --- one way to declare a command: its options are the fields of a config dataclass ------------------

def _option_help(f) -> str:
    """A field's help text, with its choices (from the registry or the fixed list) appended."""
    from finegrain.registry import Registry

    text, choices = f.metadata.get("help", ""), f.metadata.get("choices")
    if isinstance(choices, Registry):
        return f"{text} {choices.describe()}."
    if choices is not None and "," not in text:
        return f"{text} One of: {', '.join(choices)}."
    return text


def _decls(f, hint) -> list[str]:
    """A field's flags: its `flag` (default --field-name), -o for `out`; a bool without a given flag is --x/--no-x."""
    given = f.metadata.get("flag")
    flag = given or "--" + f.name.replace("_", "-")
    if f.name == "out":
        return [flag, "-o"]
    if given is None and bool in (hint, *typing.get_args(hint)):
        return [f"{flag}/--no-{flag[2:]}"]
    return [flag]


def _parameter(f, hint, arguments: dict, required) -> inspect.Parameter:
    """The typer parameter of one config field: a positional argument (named in `arguments`) or an option."""
    if f.name in required or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING):
        default = ...
    else:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if f.name in arguments:
        info = typer.Argument(metavar=arguments[f.name], help=_option_help(f))
    else:
        info = typer.Option(*_decls(f, hint), help=_option_help(f), metavar=f.metadata.get("metavar"))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[hint, info], default=default)


_CODE_LINE = re.compile(r"^\s+\S")  # after dedenting: an indented line (an example command) keeps its own line


def reflowed(doc: str) -> str:
    """`doc` dedented, each paragraph one line (blank lines between paragraphs kept), so help wraps at any width.

    An indented line stays a line of its own (examples under "Examples:"); typer shows the rest as written,
    so a hard line break inside a sentence would show as a broken line."""
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines: list[str] = []
        for line in paragraph.splitlines():
            if lines and not _CODE_LINE.match(line) and not _CODE_LINE.match(lines[-1]):
                lines[-1] = f"{lines[-1].rstrip()} {line.strip()}"
            else:
                lines.append(line.rstrip())
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _command(group: typer.Typer, name: str, config_cls, run, doc: str, arguments: dict[str, str | None] | None = None,
             required: tuple[str, ...] = ()) -> None:
    """Register command `name` on `group` (the app or a sub-app such as `manifest`): its options are the fields of
    `config_cls`; it builds the config (checked when built) and calls `run(config)`.

    arguments: field name -> metavar (None: the field's name) of the fields given as positional arguments, in
    order. required: fields the command line must give although the config has a default (a stage's --manifest).
    A ConfigError becomes one line naming the flag (or argument) the user typed, exit code 2."""
    arguments = arguments or {}
    hints = typing.get_type_hints(config_cls)
    order = list(arguments)  # the arguments first, in their order; then the options, in field order
    fields = sorted(dataclasses.fields(config_cls),
                    key=lambda f: order.index(f.name) if f.name in order else len(order))
    params = [_parameter(f, hints[f.name], arguments, required) for f in fields]
    typed = {f.name: (arguments[f.name] or f.name) if f.name in arguments else _decls(f, hints[f.name])[0].split("/")[0]
             for f in fields}

    def command(**kwargs):
        try:
            config = config_cls(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()})
        except ConfigError as e:  # name the flag the user typed, not the field
            raise FinegrainError(f"{typed.get(e.key, e.key)}{str(e)[len(e.key):]}") from None
        run(config)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = reflowed(doc)
    command.__name__ = name.replace("-", "_")
    command.config_cls = config_cls  # what declared the command (tests check every command has one)
    group.command(name)(user_errors(command))


def _printed(run):
    """`run(config)` returning text -> a command that prints it."""
    return lambda config: out.print(run(config))


# --- data ---------------------------------------------------------------------------------------------

def _register_data_commands() -> None:
    dc = data_commands
    _command(app, "demo-data", dc.DemoDataConfig, _printed(dc.run_demo_data), """Draw a synthetic fine-grained bird dataset and write its manifest to OUT_DIR/manifest.csv.

    Species differ only in bill length, crown colour, wing bar, eye ring and breast pattern;
    pose, scale, plumage, background and lighting vary freely.

    Example: finegrain demo-data demo/birds --classes 12 --per-class 40
    """, arguments={"out_dir": "OUT_DIR"})
    _command(manifest_app, "cub", dc.ManifestCubConfig, _printed(dc.run_manifest_cub), """Import the CUB-200-2011 layout (or a CUB-style variant).

    Accepts comma or space separators and 0- or 1-based ids, and says which it found.

    Example: finegrain manifest cub ~/data/CUB_200_2011 -o data_manifests/cub200.parquet
    """, arguments={"root": None})
    _command(manifest_app, "folder", dc.ManifestFolderConfig, _printed(dc.run_manifest_folder), """Import an image folder tree; class (and split) names come from folder names.

    Example: finegrain manifest folder ~/birds -o data_manifests/my_birds.csv
    """, arguments={"root": None})
    _command(manifest_app, "csv", dc.ManifestCsvConfig, _printed(dc.run_manifest_csv), """Import your own table of images.

    Example: finegrain manifest csv photos.csv --path-col file --label-col species -o my_birds.parquet
    """, arguments={"file": None})
    _command(manifest_app, "split", dc.ManifestSplitConfig, _printed(dc.run_manifest_split), """Hold out a stratified val (and optionally test) split from train; every class keeps a train image.
    With --label-fraction, also drop the labels of all but a fraction of the train images.

    Examples:
      finegrain manifest split data_manifests/cub50.parquet --val-fraction 0.1 --seed 0 -o cub50_val.parquet
      finegrain manifest split data_manifests/cub50.csv --label-fraction 0.1 --seed 0 -o cub50_10pct.csv
    """, arguments={"manifest": "MANIFEST"})
    _command(manifest_app, "relabel", dc.ManifestRelabelConfig, _printed(dc.run_manifest_relabel), """Apply the audit findings you agree with, or the decisions of a `finegrain review`, to a new manifest: a
    label error takes its suggested label; a near-duplicate or an outlier is left out. From a review folder:
    accepted labels, excluded photos left out, newly labelled photos in train, a label_source column (given /
    reviewed) and the review's provenance in the sidecar. The original manifest is not changed.

    Examples:
      finegrain manifest relabel mine.csv --from runs/review -o mine_v2.csv
      finegrain manifest relabel mine.csv --from runs/audit/audit.csv --accept 1 --accept 4 -o mine_fixed.csv
      finegrain manifest relabel mine.csv --from runs/audit/audit.csv -o mine_fixed.csv   # 'accept' column filled in
    """, arguments={"manifest": "MANIFEST"})
    _command(manifest_app, "import-labels", dc.ManifestImportLabelsConfig, _printed(dc.run_manifest_import_labels),
             """Apply labels made in another tool to a new manifest (the original is not changed): a labelled photo
    takes its label (an unlabelled one moves to train), one marked excluded is left out; column label_source says
    'reviewed' for them.

    Label Studio: make tasks with `finegrain suggest ... --label-studio tasks.json` (or audit's), import them into a
    project with the labeling config written beside them, label, export as JSON, then:

    Example: finegrain manifest import-labels mine.csv project-1-export.json -o mine_labelled.csv
    """, arguments={"manifest": "MANIFEST", "export": "EXPORT.json"})
    _command(manifest_app, "shard", dc.ManifestShardConfig, _printed(dc.run_manifest_shard), """Write a manifest's photos into shards (litdata): decoded once, resized, re-encoded, with label, split,
    box and row. Every command that takes --manifest takes the shard folder too, with the same splits and labels.

    Examples:
      finegrain manifest shard data_manifests/cub50.csv -o shards/cub50
      finegrain supcon --manifest shards/cub50 -o runs/supcon      # the folder where a manifest file went
      finegrain manifest shard big.parquet -o /data/shards/big --max-side 384 --shard-size 1GB
    """, arguments={"manifest": "MANIFEST"})
    _command(manifest_app, "validate", dc.ManifestValidateConfig, _print_validation, """Check every file and row of a manifest before training on it.

    Finds missing, undecodable or duplicated images, train/test overlap, classes without
    training images, paths leaving the root and boxes outside the image.

    Exit code 1 when there are errors; warnings are listed but do not fail.

    Example: finegrain manifest validate data_manifests/cub50.parquet
    """, arguments={"manifest": "MANIFEST"})


def _print_validation(config) -> None:
    """The validation report: problems, per-class counts, verdict; exit code 1 when it has errors."""
    manifest, report = data_commands.run_manifest_validate(config, progress=sys.stderr.isatty())
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
        if config.show_classes:
            table = Table("class", *counts.columns, title="images per class")
            for name, row in counts.iterrows():
                table.add_row(str(name), *(str(int(v)) for v in row))
            out.print(table)
    splits = ", ".join(f"{k} {v}" for k, v in sorted(manifest.split_counts().items()))
    verdict = "[green]OK[/]" if report.ok else "[red]FAILED[/]"
    out.print(f"{verdict} {config.manifest} (root {manifest.root}): {report.summary()}; {splits}")
    if not report.ok:
        raise typer.Exit(1)


# --- stages: the one stage table (finegrain.stages.STAGES) gives each config class and runner -------------

_STAGE_REQUIRED = ("manifest", "out")


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
        out.print(f"report: {artifact.path / 'report' / 'index.html'}\n{_headline('evaluate', artifact.info['metrics'])}")


HEADLINES = {"evaluate": ("classifier_top1", "knn_top1", "knn_pseudo_top1", "linear_top1", "recall_at_1", "map_at_r",
                          "open_set_auroc"),
             "pseudo_label": ("named", "held_top1", "held_top1_labels_only")}


def _headline(stage: str, metrics: dict) -> str:
    """A stage's main metrics on one line (a training stage's: its final loss and steps)."""
    keys = HEADLINES.get(stage, ("final_loss", "steps"))
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if metrics.get(k) is not None)


def _run_audit(config) -> None:
    table = STAGES["audit"].run(config)
    counts = table["issue"].value_counts().to_dict()
    out.print(f"wrote {Path(config.out) / 'audit.csv'} and audit.html: {counts.get('label', 0)} probable label errors, "
              f"{counts.get('duplicate', 0)} near-duplicates, {counts.get('outlier', 0)} outliers")


def _run_suggest(config) -> None:
    table = STAGES["suggest"].run(config)
    html = Path(config.out).with_suffix(".html")
    out.print(f"wrote {config.out}: {len(table)} photos to label next, in order; contact sheet {html}")


def _run_pseudo_label(config) -> None:
    artifact = STAGES["pseudo-label"].run(config)
    found = artifact.info["pseudo_labels"]
    out.print(f"artifact: {artifact.path}: named {artifact.info['metrics']['named']} of "
              f"{artifact.info['metrics']['unlabelled']} unlabelled photos ({found['file']}; {found['manifest']} "
              "has them in train for supcon)")


def _register_training_stages() -> None:
    from finegrain.registry import PRETRAIN_METHODS, SUPCON_LOSSES

    _command(app, "pretrain", STAGES["pretrain"].config, _run_pretrain, f"""Self-supervised pretraining of any timm backbone (--method: {", ".join(PRETRAIN_METHODS.names())}).

    Labels are ignored: every train and unlabeled image is used. Writes an artifact folder that `supcon` and `evaluate` start from. Scale out with torchrun.

    Example: finegrain pretrain --manifest data_manifests/cub50.csv --out runs/pretrain --method moco --image-size 128 --epochs 20

    Example (2 GPUs): torchrun --nproc_per_node 2 -m finegrain pretrain --manifest M --out runs/p
    """, required=_STAGE_REQUIRED)
    _command(app, "supcon", STAGES["supcon"].config, _run_supcon, f"""Supervised fine-tuning on the labelled train images (--loss: {", ".join(SUPCON_LOSSES.names())}).

    Starts from a pretrain artifact (--from) or backbone weights. Defaults are a gentle recipe for small fine-grained sets: frozen BatchNorm, backbone at 0.1x the head's rate, one head-only epoch, crop + flip views, 16 x 4 class-balanced batches. Afterwards a linear classifier is fitted on the embedding, so `finegrain predict` can name species.

    Example: finegrain supcon --manifest data_manifests/cub50.csv --from runs/pretrain --out runs/supcon --image-size 128 --epochs 10

    Example (baseline): finegrain supcon --manifest M --out runs/ce --loss ce

    Example (few labels, many unlabeled photos; a teacher that keeps the ImageNet features, then its student): finegrain supcon --manifest M --out runs/probe --backbone-lr-scale 0 --max-steps 20 && finegrain supcon --manifest M --out runs/student --teacher runs/probe
    """, required=_STAGE_REQUIRED)


def _register_feature_stages() -> None:
    _command(app, "evaluate", STAGES["evaluate"].config, _run_evaluate, """Evaluate an artifact or a bare backbone: kNN, linear probe, retrieval, per-class results, plots.

    Features are extracted with the artifact's own image size and normalisation and cached in a folder shared with audit and suggest (--features-dir), so re-running is quick. Writes report/index.html, report/metrics.json, per-class CSV and PNG plots.

    Example: finegrain evaluate --manifest data_manifests/cub50.csv --from runs/supcon --out runs/eval

    Example (frozen ImageNet weights): finegrain evaluate --manifest M --backbone tf_efficientnet_lite0 --image-size 128 --out runs/eval-frozen

    Example (with the audit's flagged counts and a link to its page in the report): finegrain evaluate --manifest M --from runs/supcon --out runs/eval --audit runs/audit
    """, required=_STAGE_REQUIRED)
    _command(app, "audit", STAGES["audit"].config, _run_audit, """Photos worth a second look: probable label errors, near-duplicates and outliers, from an artifact's embeddings.

    Label errors come from confident learning (cleanlab) on out-of-sample class probabilities of the labelled photos (a cross-validated linear probe, or --label-probs knn); near-duplicates and outliers are checked across every photo, labelled or not. Writes OUT/audit.csv (ranked: rank, issue, path, split, given and suggested label, score, reason) and OUT/audit.html (each photo beside typical photos of its given and suggested species). Nothing is changed: apply what you agree with using `finegrain manifest relabel`.

    Example: finegrain audit runs/supcon --manifest data_manifests/mine.csv -o runs/audit

    Then: finegrain manifest relabel data_manifests/mine.csv --from runs/audit/audit.csv --accept 1 --accept 4 -o data_manifests/mine_fixed.csv

    The evaluate report shows the flagged counts and links to audit.html with `finegrain evaluate ... --audit runs/audit`.
    """, arguments={"from_artifact": "ARTIFACT_DIR"}, required=(*_STAGE_REQUIRED, "from_artifact"))
    _command(app, "pseudo-label", STAGES["pseudo-label"].config, _run_pseudo_label, """Name the unlabelled photos of a manifest from its labelled ones, on fixed features (scikit-learn).

    Candidates are the manifest's 'unlabeled' rows, the labels its train rows. Curriculum self-training with the linear probe: round r of --rounds N names the r/N of each species' predicted photos the probe is surest of (class proportions balanced as in the labels) and refits it; how many rounds to keep is chosen on a held-out part of the labelled photos, never on test labels, and photos whose open-set score says "no labelled species" stay unnamed. Writes an artifact whose classifier (the probe refit on labelled + named photos) is what `predict` answers, OUT/pseudo_labels.csv and OUT/pseudo_manifest.csv (named photos in train, for supcon). `evaluate --from OUT` also reports kNN with the named photos in its gallery.

    Example: finegrain pseudo-label --manifest data_manifests/few.csv --out runs/pseudo

    Example (features of a trained artifact): finegrain pseudo-label --manifest M --from runs/supcon --out runs/pseudo2
    """, required=_STAGE_REQUIRED)
    _command(app, "suggest", STAGES["suggest"].config, _run_suggest, """Which unlabelled photos to label next: a ranked CSV and a contact sheet of thumbnails.

    Candidates are the manifest's 'unlabeled' rows; its train rows are what is labelled already. Photos are compared by the --from artifact's features (cached in --features-dir), or before any label (a cold start) by the frozen --backbone's. With few or no labels the picks are typical photos of distinct unlabelled clusters (TypiClust); once every species has a couple of labels, photos a classifier on the labels is unsure about, spread over the embedding (--strategy auto). Writes OUT.csv (rank, image_id, path, reason, score, represents: how many unlabelled photos the pick stands for, best_guess from a supcon artifact's classifier) and OUT.html beside it. Label the photos (give them a label and split train in the manifest) and run again for the next batch.

    Example: finegrain suggest --manifest data_manifests/my_birds.csv --from runs/supcon --budget 50 -o runs/next50.csv

    Example (cold start, no labels yet): finegrain suggest --manifest data_manifests/my_birds.csv --backbone tf_efficientnet_lite0 --budget 50 -o runs/first50.csv
    """, required=_STAGE_REQUIRED)


# --- predict, run, runs, backbones -------------------------------------------------------------------------

def _predict(config: PredictConfig) -> None:
    """Predictions as a CSV (--out) or a table: best species, its score, the next ones."""
    if config.model is not None:
        from finegrain.stages.predict_onnx import run_predict_onnx

        df = run_predict_onnx(config.model, config.images, top_k=config.top_k, out_csv=config.out,
                              batch_size=config.batch_size, open_set=config.open_set_scoring)
    else:
        from finegrain.stages.predict import run_predict

        df = run_predict(config.artifact, config.images, top_k=config.top_k, out_csv=config.out, device=config.device,
                         batch_size=config.batch_size, workers=config.workers, flip_tta=config.flip_tta,
                         open_set=config.open_set_scoring, features_dir=config.features_dir)
    if config.out:
        out.print(f"wrote {config.out}: {len(df)} photos")
        return
    table = Table("photo", "prediction", "score", "next")
    for row in df.itertuples(index=False):
        r = row._asdict()
        if r.get("error"):
            table.add_row(Path(r["path"]).name, "[red]unreadable[/]", "", str(r["error"]))
        else:
            nxt = ", ".join(f"{r[f'pred_{j}']} {r[f'score_{j}']:.2f}" for j in range(2, config.top_k + 1)
                            if f"pred_{j}" in r)
            named = str(r["pred_1"])
            if "known" in r and not r["known"]:
                named = f"[yellow]unknown[/] (nearest: {escape(str(r['nearest_species']))}, score {r['unknown_score']:.3f})"
            table.add_row(Path(r["path"]).name, named, f"{r['score_1']:.3f}", nxt)
    out.print(table)


def _export(config: ExportConfig) -> None:
    """Export, then say what was written and how it compared."""
    from finegrain.export.command import run_export

    record = run_export(config)
    files = ", ".join(f"{name} {f['bytes'] / 1e6:.1f} MB" for name, f in record["files"].items())
    out.print(f"wrote {config.out}: {files}; run it with: python {Path(config.out) / 'predict.py'} {config.out} PHOTOS...")
    check = record.get("int8")
    if check:
        acc = (f", top-1 {100 * check['int8_top1']:.1f}% vs fp32 {100 * check['fp32_top1']:.1f}%"
               if check.get("fp32_top1") is not None else "")
        out.print(f"int8: {check['size_ratio']:.2f} of fp32's size; same top-1 as fp32 on "
                  f"{100 * check['top1_agreement']:.1f}% of {check['photos']} {check['split']} photos{acc}")


def _run_pipeline(config: RunConfig) -> None:
    """Run the pipeline; rank 0 prints each stage's status and headline, the comparison and what to do next."""
    from finegrain.pipeline import load_pipeline, run_pipeline

    spec = load_pipeline(config.pipeline, config.overrides)
    results = run_pipeline(spec, force=config.force)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 speaks for the run
        return
    table = Table("stage", "status", "folder", "headline")
    for r in results:
        table.add_row(r.stage, r.status, str(r.path), _headline(r.stage, r.info.get("metrics") or {}))
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
    keys = [k for k in ("classifier_top1", "knn_top1", "knn_pseudo_top1", "linear_top1")
            if k in ("knn_top1", "linear_top1") or metrics.get(k) is not None]
    names = {"classifier_top1": "what predict names", "knn_top1": "kNN top-1",
             "knn_pseudo_top1": "kNN + named photos", "linear_top1": "linear probe top-1"}
    table = Table("on the same test photos", *(names[k] for k in keys), title="Compared with")
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    table.add_row("chance", *(pct(metrics["chance"]) for _ in keys))
    for name, b in (metrics.get("baselines") or {}).items():  # a baseline's classifier is its linear probe
        table.add_row("frozen start" if name == "frozen" else name, *(pct(b.get(k)) for k in keys))
    table.add_row("[bold]this model[/]", *(pct(metrics.get(k)) for k in keys))
    out.print(table)


def _print_runs(config: RunsConfig) -> None:
    """The artifacts under config.folder as trees (or JSON): stage, method, folder, headline metrics."""
    from rich.tree import Tree

    from finegrain.pipeline import list_runs, runs_tree

    roots = runs_tree(list_runs(config.folder))
    if config.as_json:
        typer.echo(json.dumps(roots, indent=2, default=str))
        return
    if not roots:
        out.print(f"no artifacts under {config.folder}")
        return
    top = Tree(f"[bold]{escape(str(config.folder))}[/]")

    def add(branch, node):
        shown = ", ".join(f"{k} {v:.3f}" for k, v in node["metrics"].items())
        what = f"[bold]{node['stage']}[/]" + (f" {escape(str(node['method']))}" if node["method"] else "")
        child = branch.add(f"{what}  {escape(node['path'])}" + (f"\n[green]{shown}[/]" if shown else ""))
        for c in node["children"]:
            add(child, c)

    for root in roots:
        add(top, root)
    out.print(top)


def _print_backbones(config: BackbonesConfig) -> None:
    """A table of the backbones with offline weights: name, embedding size, where the weights come from."""
    from finegrain.models.backbone import offline_backbones

    table = Table("backbone", "embedding", "weights from", "installed")
    for row in offline_backbones():
        table.add_row(str(row.get("name")), str(row.get("embedding_dim", row.get("embedding_size", "?"))),
                      str(row.get("source", row.get("package", ""))), "yes" if row.get("installed") else "no")
    out.print(table)


def _open_set_scores() -> str:
    """The unknown-species scores an artifact may hold, the default (supcon --open-set-score) first."""
    from finegrain.config import OPEN_SET_SCORE_HELP, SupconConfig

    default = next(f.default for f in dataclasses.fields(SupconConfig) if f.name == "open_set_score")
    order = [default] + [name for name in OPEN_SET_SCORE_HELP if name != default]
    return "; ".join(f"{name} ({OPEN_SET_SCORE_HELP[name]}){', the default' if name == default else ''}"
                     for name in order)


def _register_other_commands() -> None:
    _command(app, "predict", PredictConfig, _predict, f"""Name the species in new photos with a trained artifact's embedding and classifier.

    Writes one row per photo: path, pred_1..pred_K, score_1..score_K (probabilities) and an error for files that cannot be read. Features are cached (--features-dir), so predicting on the same photos again reads no photo.

    With --open-set on (the default for supcon artifacts that store it), also: unknown_score (the score the artifact was calibrated with, named under open_set.score in its artifact.json: {_open_set_scores()}; larger = less like any trained species), known (false when unknown_score is past the threshold calibrated to accept 95% of known-species photos) and nearest_species (the classifier's best species). pred_1 is 'unknown' for photos not known; pred_2.. and score_1.. stay the classifier's ranking (score_1 is nearest_species' probability). --open-set off writes only the columns above.

    Example: finegrain predict runs/supcon ~/photos/garden --top-k 5 -o preds.csv

    Example (an exported model, onnxruntime, no torch): finegrain predict --model export/model.onnx ~/photos/garden
    """, arguments={"artifact": "ARTIFACT_DIR", "images": "IMAGE_OR_FOLDER..."})
    _command(app, "export", ExportConfig, _export, """Take the model home: an artifact's predict path as one ONNX model, and a runner that needs no torch.

    Writes OUT/model.onnx (decoded photo in; resize, centre crop, normalise, backbone, classifier, open-set score and
    threshold inside the graph; class names, image size, threshold, versions and the artifact's hash in its
    metadata), OUT/predict.py (numpy, Pillow and onnxruntime only; the columns of `finegrain predict`),
    OUT/requirements.txt, OUT/README.md and OUT/export.json. With --int8, also OUT/model.int8.onnx (onnxruntime
    static quantization calibrated on the manifest's train photos, compared with fp32 on its val photos).

    Example: finegrain export runs/supcon -o export && python export/predict.py export ~/feeder/today -o today.csv

    Example (int8): finegrain export runs/supcon -o export --int8 --calibration-manifest data_manifests/cub50.csv
    """, arguments={"artifact": "ARTIFACT_DIR"})
    _command(app, "run", RunConfig, _run_pipeline, """Run a pipeline: data, then pretrain -> supcon -> evaluate, each from the previous artifact.

    A stage whose inputs (manifest content, parent artifact, resolved options) are unchanged is
    reused from its folder; an interrupted stage resumes from its checkpoint.

    Example: finegrain run pipelines/demo.yaml

    Example: finegrain run pipelines/cub200.yaml --set supcon.epochs=30 --set defaults.device=cuda
    """, arguments={"pipeline": "PIPELINE.yaml"})
    _command(app, "runs", RunsConfig, _print_runs, """Show the artifacts under DIR as lineage trees (each artifact under the one it was made from), with
    stage, method and headline metrics.

    Example: finegrain runs demo/runs

    Example: finegrain runs runs/ --json | jq '.[0].children[0].metrics'
    """, arguments={"folder": "DIR"})
    _command(app, "backbones", BackbonesConfig, _print_backbones, """List the backbones that have built-in offline weights (no download needed).

    Any other timm model works with --weights FILE or --pretrained (download).

    Example: finegrain backbones
    """)


def _run_review(config) -> None:
    """Load the queues (exit 2 on a missing or malformed file), then serve until Ctrl-C."""
    from finegrain.review.server import serve

    serve(config)


def _register_review() -> None:
    from finegrain.review.config import ReviewConfig

    _command(app, "review", ReviewConfig, _run_review, """Decide in the browser, one key each: probable label errors, twins and outliers (--audit), photos to
    label (--suggest, or every unlabelled photo) and unknown or unsure predictions (--predict).

    Starts a local web app and prints its URL. Each decision is saved at once in REVIEW_DIR; run the command again
    with the same folder to go on. Then `finegrain manifest relabel MANIFEST --from REVIEW_DIR -o NEW.csv` writes
    the new manifest (the original is not changed).

    Example: finegrain review data_manifests/mine.csv -o runs/review --audit runs/audit --suggest runs/next50.csv
    """, arguments={"manifest": "MANIFEST"})


# Registration order is the order of `finegrain --help`.
_register_data_commands()
_register_training_stages()
_register_feature_stages()
_register_review()
_register_other_commands()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
