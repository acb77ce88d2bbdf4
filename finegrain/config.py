"""One dataclass per stage, checked when it is built; the CLI, pipeline files and Python fill them alike.

Every field carries its help text (the CLI's option help) and, where it has one, its check: a range,
fixed choices or a registry of names. Building a config converts each value to its declared type
(pipeline YAML gives '1e-3' as a string) or stops with a ConfigError naming the key, before any file
is read.

A method's or loss's own options (SupCon's temperature, MoCo's queue size) live in its file, as the
`Options` dataclass of its class (a `MethodOptions`). `with_method_options` gives the stage config one
flat field per option some method declares (so flags and pipeline keys stay flat), default None: the
chosen method's own default. `config.method_options()` builds the chosen method's Options from them;
setting one that the chosen method does not read is refused, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from finegrain.errors import FinegrainError
from finegrain.registry import PRETRAIN_METHODS, SAMPLERS, SUPCON_LOSSES, VIEW_RECIPES, Registry


class ConfigError(FinegrainError):
    """A config value of the wrong type, out of range, or not a known name. `key` names the field."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class Check:
    """A range check: `test(value)` must hold; `says` completes 'must be ...'."""

    test: typing.Callable[[object], bool]
    says: str


def at_least(low) -> Check:
    return Check(lambda v: v >= low, f"at least {low}")


def between(low, high) -> Check:
    return Check(lambda v: low <= v <= high, f"between {low} and {high}")


POSITIVE = Check(lambda v: v > 0, "greater than 0")
FRACTION_BELOW_1 = Check(lambda v: 0 <= v < 1, "at least 0 and below 1")
FRACTION_ABOVE_0 = Check(lambda v: 0 < v <= 1, "above 0 and at most 1")


def option(default=dataclasses.MISSING, help: str = "", *, check: Check | None = None, choices=None,
           method_option: bool = False, flag: str | None = None, default_factory=dataclasses.MISSING,
           metavar: str | None = None):
    """A config field with its CLI help, its check, and its choices (a tuple or a Registry).

    flag: the CLI flag (default --field-name; for a bool, given flags are used as they are, e.g. "--json").
    metavar: what the help shows for the value (default: its type)."""
    metadata = {"help": help, "check": check, "choices": choices, "method_option": method_option, "flag": flag,
                "metavar": metavar}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


DEVICES = ("auto", "cpu", "cuda")
INDEX_KINDS = ("auto", "flat", "ivfpq")  # eval/index.py
AMP_MODES = ("auto", "off", "bf16", "fp16")
WANDB_MODES = ("offline", "online", "disabled")
BAD_IMAGE_POLICIES = ("error", "skip")
LABELLED_SPLITS = ("train", "val", "test")
UNLABELED_MODES = ("none", "pseudo")
TRAIN_LAYERS = ("all", "bn", "last")
# eval/open_set.py's SCORES (config imports no torch): name -> what it measures (supcon's and predict's help)
OPEN_SET_SCORE_HELP = {
    "relative_mahalanobis": "Ren et al. 2021: distance to the nearest species' mean minus the distance to all "
                            "photos' mean",
    "knn_distance": "distance to the --open-set-k-th nearest train photo, Sun et al. 2022",
}
OPEN_SET_SCORES = tuple(OPEN_SET_SCORE_HELP)
AUDIT_PROBABILITIES = ("ensemble", "linear", "knn")
DEVICE = Check(lambda v: v in DEVICES or v.startswith("cuda:"), "auto, cpu, cuda or cuda:N")


# --- a method's own options ----------------------------------------------------------------------

@dataclass
class MethodOptions:
    """Base of a method's (or loss's) `Options` dataclass: fields made with `option()`, checked when built."""

    def __post_init__(self):
        check_fields(self)


_OPTION_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def with_method_options(registry: Registry):
    """Class decorator: the config class plus one flat field per option that some entry of `registry`
    declares (default None: the chosen entry's own default), with help naming who reads it and its default.

    The options are read from the entries' source while `registry` is not loaded, so help needs no torch.
    """

    def add(cls):
        readers: dict[str, dict[str, object]] = {}  # option -> {entry: OptionSpec}
        for entry, specs in registry.options().items():
            for name, spec in specs.items():
                readers.setdefault(name, {})[entry] = spec
        fields = []
        for name, by_entry in readers.items():
            types = {spec.type for spec in by_entry.values()}
            if len(types) != 1 or next(iter(types)) not in _OPTION_TYPES:
                raise TypeError(f"{registry.kind} option {name!r}: one of {', '.join(_OPTION_TYPES)} for every "
                                f"entry that declares it, got {sorted(types)}")
            hint = _OPTION_TYPES[types.pop()] | None
            fields.append((name, hint, option(None, _readers_help(by_entry), method_option=True)))
        namespace = {"__doc__": cls.__doc__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
        return dataclasses.make_dataclass(cls.__name__, fields, bases=(cls,), namespace=namespace)

    return add


def _readers_help(by_entry: dict) -> str:
    """'simclr: NT-Xent temperature (default 0.5). moco: ...' with entries of the same help and default merged."""
    groups: dict[tuple[str, object], list[str]] = {}
    for entry, spec in by_entry.items():
        groups.setdefault((spec.help.rstrip("."), spec.default), []).append(entry)
    return " ".join(f"{', '.join(entries)}: {text} (default {default})." for (text, default), entries in groups.items())


@dataclass
class CommandConfig:
    """A command's options, checked when built: each field is converted to its type and checked (range,
    choices), then `check()` checks across fields. Every command's options are such a dataclass."""

    def __post_init__(self):
        check_fields(self)
        self.check()

    def check(self) -> None:
        """Checks across fields (subclasses extend)."""

    def to_dict(self) -> dict:
        """Plain dict of every field (for YAML, W&B and artifact.json)."""
        return dataclasses.asdict(self)


# A command's config holds only the options it reads (tests/test_help.py runs each command and checks). The
# building blocks below are combined per command: e.g. audit reads an artifact, so it has no --backbone.

@dataclass
class DataConfig(CommandConfig):
    """What every command that reads a manifest's photos takes: data, output, device, decoding."""

    manifest: str = option("", "Manifest file (.csv/.parquet) of the images.")
    out: str = option("", "Output folder for the stage's artifact.", flag="--out")
    root: str | None = option(None, "Dataset root (overrides the one stored in the manifest).")
    device: str = option("auto", "auto, cpu or cuda (cuda:N for one GPU).", check=DEVICE)
    amp: str = option("auto", "Mixed precision: auto (bf16/fp16 on CUDA, off on CPU), off, bf16, fp16.", choices=AMP_MODES)
    seed: int = option(0, "Random seed (data order, augmentations, initialisation).")
    workers: int = option(2, "DataLoader worker processes.", check=at_least(0))
    cache_images: bool = option(True, "Decode and resize images once into a uint8 memory map.")
    cache_dir: str | None = option(None, "Folder for the decoded-image cache (default ~/.cache/finegrain/images or "
                                         "$FINEGRAIN_CACHE).")
    on_bad_image: str = option("error", "error: stop before training if a file is bad; skip: leave bad files out.",
                               choices=BAD_IMAGE_POLICIES)


@dataclass
class BackboneOptions:
    """The backbone a command builds when it reads no artifact (a mixin of config classes)."""

    backbone: str = option("tf_efficientnet_lite0", "Any timm model name; `finegrain backbones` lists what works offline.")
    weights: str | None = option(None, "Backbone weights: a .safetensors/.pth state dict, 'builtin' (offline ImageNet "
                                       "weights), or 'none'. Default: builtin when the backbone has them.")
    pretrained: bool = option(False, "Download timm hub weights (needs internet).")


@dataclass
class TrackingOptions:
    """Where a stage's run is tracked: Weights & Biases (a mixin of config classes)."""

    wandb: str = option("offline", "Weights & Biases mode: offline (default, no account needed), online, disabled.",
                        choices=WANDB_MODES)
    wandb_project: str = option("finegrain", "W&B project.")
    wandb_entity: str | None = option(None, "W&B entity (user or team).")
    wandb_tags: list[str] = option(help="W&B tag (repeat for several).", flag="--wandb-tag", default_factory=list)


@dataclass
class StageConfig(TrackingOptions, DataConfig):
    """What every stage run by stages/skeleton.py's stage_run takes (pretrain, supcon, evaluate, audit): data,
    device and tracking; the manifest is checked and the run tracked in W&B and metrics.jsonl."""


@dataclass
class TrainConfig(BackboneOptions, StageConfig):
    """Options shared by the training stages (pretrain, supcon). Sizes in pixels.

    `lr` is used as given; None means the method's base rate scaled by batch_size / 256.
    """

    image_size: int = option(224, "Training image side in pixels.", check=at_least(8))
    batch_size: int = option(64, "Images per batch per process.", check=at_least(1))
    epochs: int = option(10, "Passes over the training images.", check=at_least(1))
    max_steps: int | None = option(None, "Stop after this many optimizer steps (the schedule is sized for it).",
                                   check=at_least(1))
    lr: float | None = option(None, "Learning rate (default: the method's base rate x batch / 256).", check=POSITIVE)
    optimizer: str = option("sgd", "timm optimizer name: sgd, adamw, lars, ...")
    weight_decay: float = option(1e-4, "Weight decay.", check=at_least(0))
    warmup_epochs: float = option(1.0, "Linear warm-up length in epochs, then cosine decay.", check=at_least(0))
    accumulate: int = option(1, "Gradient accumulation: micro-batches per optimizer step.", check=at_least(1))
    channels_last: bool = option(True, "Channels-last (NHWC) memory format: faster on CPU and with AMP on GPUs.")
    compile: bool = option(False, "torch.compile the train step (first steps are slow while it compiles).")
    sync_bn: bool = option(True, "Synchronise BatchNorm across processes under torchrun (CUDA).")
    freeze_bn: bool = option(True, "Keep the backbone's BatchNorm statistics and affine parameters as loaded (ignored "
                                   "for random initial weights). Small sets of augmented views otherwise wreck "
                                   "ImageNet statistics in a few dozen steps.")
    checkpoint_every: int = option(0, "Also checkpoint every N optimizer steps (0: at epoch ends only).", check=at_least(0))
    log_every: int = option(10, "Optimizer steps between logged metric lines.", check=at_least(1))
    resume: bool = option(False, "Continue the unfinished run in --out from its checkpoint.")
    keep_checkpoint: bool = option(False, "Keep checkpoint.pt (the training state for --resume: weights, optimizer, RNGs) "
                                          "in --out after the run completes; by default it is "
                                          "removed once the artifact is written.")
    knn_monitor: bool = option(True, "Report kNN accuracy on labelled val/test images (a fixed class-balanced sample "
                                     "of at most 1,000 train and 500 val/test photos) at the start, after epochs and "
                                     "at the end.")
    knn_monitor_share: float = option(0.1, "Most of the run's time the kNN monitor may take: an epoch end's reading is "
                                           "skipped when it would take the monitor past this share; the first and last "
                                           "readings are always taken. 1 reads after every epoch.",
                                      check=FRACTION_ABOVE_0)
    ema_decay: float = option(0.0, "Keep an exponential moving average of the weights (decay per optimizer step, "
                                   "warmed up from 0 as in timm's ModelEmaV3) and write it as the result; 0 is off.",
                              check=Check(lambda v: 0 <= v < 1, "at least 0 and below 1"))
    divergence_guard: bool = option(True, "Stop a run whose loss climbs far above its start or stays stuck, or whose "
                                          "train or kNN accuracy falls to chance; the last good checkpoint is kept.")


@with_method_options(PRETRAIN_METHODS)
@dataclass
class PretrainConfig(TrainConfig):
    """`finegrain pretrain`: self-supervised pretraining (labels ignored)."""

    method: str = option("simclr", "Self-supervised method:", choices=PRETRAIN_METHODS)
    views: str | None = option(None, "View recipe (default: color_safe from loaded weights, simclr from random "
                                     "ones):", choices=VIEW_RECIPES)
    train_layers: str | None = option(None, "Which backbone weights train: all; bn (BatchNorm affine parameters only, "
                                            "HPT's BN-only variant; they train even with --freeze-bn, the statistics "
                                            "stay as loaded); last (the last stage and what follows it). "
                                            "Default: bn from loaded weights (they keep their features), all from "
                                            "random ones.", choices=TRAIN_LAYERS)

    def check(self) -> None:
        self.method_options()

    def method_options(self) -> MethodOptions:
        """The chosen method's own options (its `Options`), from this config's flat fields."""
        return chosen_options(self, PRETRAIN_METHODS, self.method, f"--method {self.method}")

    def to_dict(self) -> dict:
        return {**super().to_dict(), **dataclasses.asdict(self.method_options())}


@with_method_options(SUPCON_LOSSES)
@dataclass
class SupconConfig(TrainConfig):
    """`finegrain supcon`: supervised (contrastive) fine-tuning on the labelled train images.

    The defaults are a gentle fine-tuning recipe for small fine-grained sets: SupCon + cross-entropy,
    BatchNorm frozen, the backbone at 0.1x the head's learning rate, one head-only warm-up epoch,
    crop + flip views (colour is a species cue) and P x K class-balanced batches (16 classes x 4
    images). benchmarks/README.md has the measurements behind each choice.
    """

    lr: float | None = option(None, "Head learning rate (default 0.2 x batch / 256); the backbone gets "
                                    "--backbone-lr-scale of it.", check=POSITIVE)
    from_artifact: str | None = option(None, "Artifact folder to start from (a pretrain or supcon run); its backbone "
                                             "name and weights are used.", flag="--from")
    loss: str = option("supcon_ce", "Training objective:", choices=SUPCON_LOSSES)
    views: str = option("supcon", "View recipe:", choices=VIEW_RECIPES)
    n_views: int = option(2, "Augmented views of each image per batch.", check=at_least(1))
    sampler: str = option("pk", "Batch sampler:", choices=SAMPLERS)
    classes_per_batch: int = option(16, "P of the P x K sampler; K = batch size / P.", check=at_least(1))
    backbone_lr_scale: float = option(0.1, "Backbone learning rate as a fraction of the head's.", check=at_least(0))
    layer_decay: float | None = option(None, "timm layer-wise learning-rate decay over the backbone's blocks (e.g. "
                                             "0.75; default off).", check=FRACTION_ABOVE_0)
    head_warmup_epochs: float = option(1.0, "Epochs that train only the new head before the backbone is unfrozen "
                                            "(LP-FT).", check=at_least(0))
    classifier: bool = option(True, "Fit a logistic-regression classifier on the embedding after training (used by "
                                    "predict), and calibrate its unknown-species score (--open-set-score) on the "
                                    "train features (stored in the artifact, N x D float16, with their labels), "
                                    "thresholded to accept 95% of known-species val photos (or of a train hold-out).")
    open_set_score: str = option("relative_mahalanobis", "The unknown-species score: " + " or ".join(
        f"{name} ({what})" for name, what in OPEN_SET_SCORE_HELP.items()) + ".", choices=OPEN_SET_SCORES)
    open_set_k: int = option(5, "Which nearest train photo's distance is the knn_distance score; capped at the "
                                "median train photos per species.", check=at_least(1))
    unlabeled: str = option("none", "What to do with the manifest's unlabeled photos: none (train on labels only) or "
                                    "pseudo (a slowly moving average of the model labels them; those it is confident "
                                    "about join the SupCon term with their pseudo-labels, see --pseudo-ce). For "
                                    "distillation from a trained artifact use --teacher.",
                            choices=UNLABELED_MODES)
    unlabeled_batch_size: int = option(0, "Unlabeled photos per batch beside the labelled ones (0: as many as "
                                          "--batch-size).", check=at_least(0))
    pseudo_threshold: float = option(0.6, "--unlabeled pseudo: the teacher's mean class probability over a photo's "
                                          "views must reach this for the photo to get a pseudo-label; the rest (other "
                                          "species, unclear photos) are left out of the loss.",
                                     check=Check(lambda v: 0 < v < 1, "above 0 and below 1"))
    pseudo_ce: bool = option(False, "--unlabeled pseudo: pseudo-labelled photos join the cross-entropy term too "
                                    "(FixMatch-style); by default only the SupCon term (Self-Tuning-style). --loss ce "
                                    "always uses them in its cross-entropy.")
    teacher_momentum: float = option(0.99, "--unlabeled pseudo: the teacher is an average of the model's weights with "
                                           "this momentum per step (ramped up as in Mean Teacher).", check=between(0, 1))
    teacher: str | None = option(None, "A supcon artifact whose class probabilities the model learns to match on "
                                       "labelled and unlabeled photos (self-training by distillation, Su et al. 2021).",
                                 flag="--teacher")
    distill_weight: float = option(0.7, "--teacher: the classifier's loss is this x KL(teacher, student) + (1 - this) "
                                        "x cross-entropy on the labels.", check=between(0, 1))
    distill_temperature: float = option(1.0, "--teacher: temperature of both distributions in the KL term.",
                                        check=POSITIVE)
    wise_ft: float = option(1.0, "After training, the backbone becomes this mix of its fine-tuned and starting weights "
                                 "(WiSE-FT, Wortsman et al. 2022): 1 keeps the fine-tuned weights, 0.5 is halfway.",
                            check=between(0, 1))

    def check(self) -> None:
        self.method_options()
        self._check_unlabeled()
        if self.sampler == "pk" and self.batch_size % self.classes_per_batch:
            raise ConfigError("batch_size", f"{self.batch_size} must be a multiple of classes_per_batch "
                                            f"{self.classes_per_batch} (P x K batches)")

    def method_options(self) -> MethodOptions:
        """The chosen loss's own options (its `Options`), from this config's flat fields."""
        return chosen_options(self, SUPCON_LOSSES, self.loss, f"--loss {self.loss}")

    def to_dict(self) -> dict:
        return {**super().to_dict(), **dataclasses.asdict(self.method_options())}

    def _check_unlabeled(self) -> None:
        """--unlabeled pseudo and --teacher need a loss with a classifier and exclude each other."""
        key = "teacher" if self.teacher else "unlabeled" if self.unlabeled != "none" else None
        if key is None:
            return
        if self.teacher and self.unlabeled != "none":
            raise ConfigError("teacher", "--teacher already uses the unlabeled photos (with its soft labels); "
                                         "drop --unlabeled pseudo or --teacher")
        if not getattr(SUPCON_LOSSES.get(self.loss), "has_classifier", False):
            with_classifier = [n for n in SUPCON_LOSSES.names() if getattr(SUPCON_LOSSES.get(n), "has_classifier", False)]
            raise ConfigError(key, f"needs a loss with a classifier ({', '.join(with_classifier)}); --loss {self.loss} "
                                   "has none")


@dataclass
class FeatureConfig(DataConfig):
    """What every command that reads an artifact's (or a bare backbone's) features of manifest photos takes."""

    from_artifact: str | None = option(None, "Artifact folder to read features with (a pretrain or supcon run, or an "
                                             "evaluate folder: the model it evaluated, at its image size).",
                                       flag="--from")
    image_size: int | None = option(None, "Feature image side (default: 1.125 x the artifact's training size, as "
                                          "FixRes advises; 224 without --from).", check=at_least(8))
    bbox_crop: bool = option(False, "Crop images to their bounding boxes (when the manifest has them).")
    flip_tta: bool = option(True, "Average each image's features with its mirror image's (test-time augmentation).")
    batch_size: int = option(128, "Images per batch for feature extraction.", check=at_least(1))
    features_dir: str | None = option(None, "Folder of the features cache (default $FINEGRAIN_CACHE/features, else "
                                            "~/.cache/finegrain/features), shared by evaluate, audit, suggest and predict. "
                                            "Entries are keyed by model weights, preprocessing and photos: a photo is "
                                            "extracted once per model.")


@dataclass
class EvaluateConfig(BackboneOptions, FeatureConfig, StageConfig):
    """`finegrain evaluate`: kNN, linear probe, retrieval and a report, for an artifact or a bare backbone."""

    out: str = option("", "Output folder for the evaluation (report/, metrics).", flag="--out")
    backbone: str = option("tf_efficientnet_lite0", "timm backbone to evaluate when no --from is given.")
    from_artifact: str | None = option(None, "Artifact folder to evaluate (a pretrain or supcon run).", flag="--from")
    knn_k: int = option(20, "kNN neighbours (k).", check=at_least(1))
    knn_t: float = option(0.07, "kNN temperature on cosine similarity.", check=POSITIVE)
    index: str = option("auto", "Neighbour search for kNN and retrieval: flat (exact), ivfpq (faiss IVF-PQ, "
                                "approximate, re-ranked on exact cosine; bounded memory for millions of photos) "
                                "or auto (flat up to 200,000 reference photos, ivfpq above).",
                        choices=INDEX_KINDS)
    linear: bool = option(True, "Fit a linear probe (logistic regression, C chosen on val or a train hold-out).")
    retrieval_split: str = option("test", "Split to compute Recall@K and MAP@R on (leave-one-out; classes may be unseen "
                                          "in training).", choices=LABELLED_SPLITS)
    embedding_map: bool = option(True, "Draw a t-SNE map of the test embeddings.")
    audit: str | None = option(None, "A `finegrain audit` output folder: the report shows its flagged counts and "
                                     "links to its audit.html.")
    report_examples: int = option(0, "Correctly predicted test photos shown per species in the report (0: none).",
                                  check=at_least(0))
    compare: str = option("lineage", "What the report compares the artifact with, on the same photos: lineage (the "
                                     "frozen starting backbone and every earlier artifact), frozen (the starting "
                                     "backbone only) or none. Each costs one more feature extraction.",
                          choices=("lineage", "frozen", "none"))


@dataclass
class AuditConfig(FeatureConfig, StageConfig):
    """`finegrain audit`: photos whose label, twin or oddity deserves a second look, from an artifact's embeddings."""

    out: str = option("", "Output folder (audit.csv, audit.html).", flag="--out")
    label_probs: str = option("ensemble", "Out-of-sample class probabilities for confident learning: knn (leave-one-out "
                                       "neighbours on the embeddings), linear (a 5-fold cross-validated probe) or "
                                       "ensemble (their mean).",
                              choices=AUDIT_PROBABILITIES)
    knn_k: int = option(20, "Neighbours that vote for a photo's species (label_probs knn).", check=at_least(1))
    knn_t: float = option(0.07, "Temperature of the neighbours' votes on cosine similarity.", check=POSITIVE)
    duplicate_threshold: float = option(0.13, "Near-duplicates: pairs closer than this x the median distance of a "
                                              "photo to its nearest other one.", check=POSITIVE)
    examples: int = option(3, "Typical photos of each species shown beside a flagged one in audit.html.",
                           check=at_least(0))
    max_flagged: int = option(300, "Flagged photos shown in audit.html (audit.csv lists them all).", check=at_least(1))
    label_studio: str | None = option(None, "Also write the findings as Label Studio import tasks to this JSON file "
                                            "(the suggested species, or the exclude choice for twins and outliers, "
                                            "as pre-annotations) and its labeling config beside it "
                                            "(.label_config.xml); read the labels back with `manifest import-labels`.")

    def check(self) -> None:
        if not self.from_artifact:
            raise ConfigError("from_artifact", "is required: the artifact whose embeddings to audit with")


@dataclass
class PseudoLabelConfig(BackboneOptions, FeatureConfig, StageConfig):
    """`finegrain pseudo-label`: name the manifest's unlabelled photos from its labelled ones, on fixed features.

    Labelled photos are the train rows, candidates the 'unlabeled' rows. The rounds are chosen on held-out parts of
    the labelled photos; the artifact's classifier is the probe refit on labelled + named photos.
    """

    out: str = option("", "Output folder for the artifact (classifier, pseudo_labels.csv, pseudo_manifest.csv).",
                      flag="--out")
    from_artifact: str | None = option(None, "Artifact whose features to label with (a pretrain or supcon run; "
                                             "default: --backbone's weights as they are).", flag="--from")
    image_size: int | None = option(None, "Feature image side (default: 1.125 x the artifact's training size; 144 "
                                          "without --from, the reading of a 128 px model).", check=at_least(8))
    rounds: int = option(5, "Curriculum length N: round r names the r/N of each species' predicted photos the "
                            "probe is surest of, then refits it; the most rounds within one standard error of the "
                            "best held-out top-1 (five hold-outs of the labelled photos) are kept.", check=at_least(1))
    balance: bool = option(True, "Balance the probe's class probabilities (Sinkhorn-Knopp) so the named photos' "
                                 "species come in the labelled photos' proportions; turn off when the unlabelled "
                                 "photos are known to be spread very differently.")
    open_set_keep: float = option(0.95, "Unknown species stay unnamed: a photo is named only when its open-set score "
                                        "(relative Mahalanobis to the labelled photos) is below the one that accepts "
                                        "this fraction of held-out labelled photos (1: no filter).",
                                  check=FRACTION_ABOVE_0)


SUGGEST_STRATEGIES = ("auto", "typiclust", "probcover", "uncertainty")


@dataclass
class SuggestConfig(BackboneOptions, FeatureConfig):
    """`finegrain suggest`: which unlabelled photos of a manifest to label next, ranked on an artifact's features.

    Labelled photos are the manifest's train rows; candidates its 'unlabeled' rows.
    """

    out: str = option("", "CSV of the photos to label next (rank, path, reason, ...); a contact sheet with "
                          "thumbnails is written beside it with the suffix .html.", flag="--out")
    from_artifact: str | None = option(None, "Artifact folder whose features rank the photos (a pretrain or supcon "
                                             "run, whose classifier also adds a best guess; or an evaluate folder: "
                                             "the model it evaluated). Without it, the frozen --backbone: a cold "
                                             "start, before any label.", flag="--from")
    budget: int = option(20, "How many photos to suggest (at most the number of unlabelled photos).",
                         check=at_least(1))
    strategy: str = option("auto", "How to choose. typiclust: the most typical photo of each of the largest "
                                   "unlabelled clusters (Hacohen et al. 2022), for a cold start; probcover: photos "
                                   "whose neighbourhoods cover the most unlabelled photos (Yehuda et al. 2022), a "
                                   "cold start too, refused above --probcover-limit photos; uncertainty: among the 10 x "
                                   "budget photos a logistic regression on the labelled train photos is least sure "
                                   "about, one per uncertainty-weighted k-means cluster (CLUE, Prabhu et al. 2021; "
                                   "Zhdanov 2019); auto: "
                                   "typiclust while there are fewer labelled train photos than "
                                   "--cold-start-per-class per species (or fewer than 2 species), else uncertainty.",
                           choices=SUGGEST_STRATEGIES)
    cold_start_per_class: float = option(2.0, "--strategy auto: labelled train photos per species below which "
                                              "typiclust is used.", check=at_least(0))
    label_studio: str | None = option(None, "Also write the picks as Label Studio import tasks to this JSON file (the "
                                            "best guess as a pre-annotation) and its labeling config beside it "
                                            "(.label_config.xml); read the labels back with `manifest import-labels`.")
    probcover_limit: int = option(8000, "--strategy probcover: refuse more photos (labelled train + unlabelled) than "
                                        "this; it holds all N x N distances (8000 photos: about 0.5 GB).",
                                  check=at_least(2))

    def check(self) -> None:
        if not self.out.lower().endswith(".csv"):
            raise ConfigError("out", f"must be a .csv file (the contact sheet goes beside it as .html), got "
                                     f"{self.out!r}")


# --- checking ----------------------------------------------------------------------------------

def check_fields(config) -> None:
    """Convert every field of `config` to its declared type and check its range and choices, in place."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = _convert(f.name, getattr(config, f.name), hints[f.name])
        setattr(config, f.name, value)
        if value is None:
            continue
        check, choices = f.metadata.get("check"), f.metadata.get("choices")
        if check is not None and not check.test(value):
            raise ConfigError(f.name, f"must be {check.says}, got {value!r}")
        if isinstance(choices, Registry):
            try:
                choices.get(value)
            except FinegrainError as e:
                raise ConfigError(f.name, str(e)) from None
        elif choices is not None and value not in choices:
            raise ConfigError(f.name, f"must be one of {', '.join(choices)}, got {value!r}")


def _convert(key: str, value, hint):
    """`value` as the type `hint` (int, float, bool, str, Path, list[X], X | None), or ConfigError."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        return _convert(key, value, hint)
    if typing.get_origin(hint) is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(key, f"must be a list of {args[0].__name__}, got {value!r}")
        return [_convert(key, v, args[0]) for v in items]
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
    elif hint is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"must be text, got {value!r} ({type(value).__name__}); quote it in YAML")
    raise ConfigError(key, f"must be {_type_name(hint)}, got {value!r}")


def _type_name(hint) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", Path: "a path"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def method_option_names(config_cls) -> list[str]:
    """The flat fields of `config_cls` that only some methods (or losses) read."""
    return [f.name for f in dataclasses.fields(config_cls) if f.metadata.get("method_option")]


def chosen_options(config, registry: Registry, name: str, chosen: str) -> MethodOptions:
    """The Options of `registry`'s entry `name`, from `config`'s flat fields that are set (not None).

    ConfigError naming the key if a set field is one the entry does not read, or out of its range.
    """
    options_cls = getattr(registry.get(name), "Options", MethodOptions)
    own = [f.name for f in dataclasses.fields(options_cls)]
    for key in method_option_names(type(config)):
        if key not in own and getattr(config, key) is not None:
            raise ConfigError(key, f"{chosen} does not use this option (it uses: {', '.join(own) or 'none'}); "
                                   "remove it")
    return options_cls(**{key: getattr(config, key) for key in own if getattr(config, key, None) is not None})


def config_from_dict(cls, values: dict, where: str = ""):
    """Build and check a config dataclass from a dict, refusing unknown keys with the list of known ones.

    where: prefix for error messages (e.g. "pipelines/demo.yaml: stages.supcon").
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    prefix = f"{where}." if where else ""
    if unknown:
        close = [m for k in unknown for m in difflib.get_close_matches(k, names, n=1)]
        raise FinegrainError(f"unknown option(s) {', '.join(prefix + k for k in unknown)}"
                             + (f" (did you mean {', '.join(close)}?)" if close else "")
                             + f"; known: {', '.join(sorted(names))}")
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(prefix + e.key, str(e).split(": ", 1)[1]) from None


# --- the other commands' options -------------------------------------------------------------------

ON_OFF = Check(lambda v: v in ("on", "off"), "on or off")


@dataclass
class PredictConfig(CommandConfig):
    """`finegrain predict`: name the species in photos with a supcon artifact's classifier."""

    artifact: Path | None = option(None, "A supcon artifact (it holds a classifier); with --model, a photo.")
    images: list[Path] = option(help="Photos, or folders searched recursively.", default_factory=list)
    model: Path | None = option(None, "An exported model (`finegrain export`'s model.onnx or its folder): predict "
                                      "with onnxruntime, no torch; every argument is then a photo.")
    top_k: int = option(5, "Species to list per photo.", check=at_least(1))
    out: Path | None = option(None, "CSV to write (default: print a table).", flag="--out")
    device: str = option("auto", "auto, cpu or cuda.", check=DEVICE)
    batch_size: int = option(64, "Images per batch.", check=at_least(1))
    workers: int = option(2, "DataLoader worker processes.", check=at_least(0))
    flip_tta: bool | None = option(None, "Average each photo's features with its mirror image's (default: as the "
                                         "classifier was fitted).")
    open_set: str | None = option(None, "Name photos unlike every trained species 'unknown' (default: on when the "
                                        "artifact stores a calibration, as supcon artifacts do; off for older ones).",
                                  check=ON_OFF, metavar="on|off")
    features_dir: str | None = option(None, "Folder of the features cache (default $FINEGRAIN_CACHE/features, else "
                                            "~/.cache/finegrain/features): a photo predicted before (same file, same "
                                            "artifact) is not read again.")

    def check(self) -> None:
        if self.model is not None and self.artifact is not None:  # `predict --model M PHOTO...`: all are photos
            self.images, self.artifact = [self.artifact, *self.images], None
        if self.model is None and self.artifact is None:
            raise ConfigError("artifact", "give an artifact folder (or an exported model with --model)")
        if not self.images:
            raise ConfigError("images", "give at least one photo or folder")
        if self.model is not None and self.flip_tta is not None:
            raise ConfigError("flip_tta", "an exported model averages flips as it was exported; drop --flip-tta")

    @property
    def open_set_scoring(self) -> bool | None:
        """--open-set as run_predict takes it: None (as the artifact stores), True or False."""
        return None if self.open_set is None else self.open_set == "on"


EXPORT_FORMATS = ("onnx",)


@dataclass
class ExportConfig(CommandConfig):
    """`finegrain export`: an artifact's predict path as one ONNX model, with a runner that needs no torch."""

    artifact: Path = option(help="A supcon artifact (it holds a classifier).")
    out: Path = option(help="Folder to write: model.onnx, predict.py, requirements.txt, README.md, export.json.",
                       flag="--out")
    format: str = option("onnx", "Model format.", choices=EXPORT_FORMATS)
    int8: bool = option(False, "Also write model.int8.onnx: onnxruntime static quantization of the convolutions, "
                               "calibrated on the train photos of --calibration-manifest.")
    calibration_manifest: Path | None = option(None, "Manifest whose train photos calibrate --int8 (its val or test "
                                                     "photos then measure int8 against fp32).")
    calibration_photos: int = option(200, "Train photos to calibrate --int8 with.", check=at_least(1))
    check_photos: int = option(200, "Val (else test) photos of --calibration-manifest to compare int8 with fp32 on.",
                               check=at_least(0))
    per_channel: bool = option(False, "--int8 with one scale per output channel (reduce_range on).")
    seed: int = option(0, "Seed for drawing the calibration photos.")
    wandb: str = option("disabled", "Weights & Biases mode: offline, online, disabled. The export is logged as a model "
                                    "artifact whose parent is the supcon artifact's.", choices=WANDB_MODES)
    wandb_project: str = option("finegrain", "W&B project.")
    wandb_entity: str | None = option(None, "W&B entity (user or team).")

    def check(self) -> None:
        if self.int8 and self.calibration_manifest is None:
            raise ConfigError("calibration_manifest", "--int8 needs photos to calibrate with: give the manifest "
                                                      "the artifact was trained on")


@dataclass
class RunConfig(CommandConfig):
    """`finegrain run`: run a pipeline file, with overrides."""

    pipeline: Path = option(help="Pipeline file (see pipelines/).")
    overrides: list[str] = option(help="Override an option: stage.key=value, defaults.key=value, data.split.seed=1 "
                                       "(repeatable).", flag="--set", default_factory=list)
    force: list[str] = option(help="Rerun this stage even if cached (repeatable).", default_factory=list)


@dataclass
class RunsConfig(CommandConfig):
    """`finegrain runs`: the artifacts under a folder as lineage trees."""

    folder: Path = option(Path("runs"), "Folder to search for artifacts.")
    as_json: bool = option(False, "Print the tree as JSON (for scripts).", flag="--json")


@dataclass
class BackbonesConfig(CommandConfig):
    """`finegrain backbones`: no options."""
