"""Supervised objectives for `supcon`: a head on the backbone's pooled features plus a loss, by name.

Every objective trains on the same engine, sampler and views, so `--loss` choices compare fairly.
Adding one is a `SupervisedMethod` subclass registered in SUPCON_LOSSES (here or in its own file in
this package) that builds its head and says its loss; its options are its `Options` dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from finegrain.config import FRACTION_BELOW_1, POSITIVE, Check, MethodOptions, at_least, option
from finegrain.losses.contrastive import contrastive
from finegrain.losses.cross_entropy import labelled_cross_entropy
from finegrain.losses.distillation import soft_target_kl
from finegrain.losses.supcon import supcon
from finegrain.losses.triplet import batch_hard_triplet
from finegrain.methods.base import BackboneMethod, ProjectionOptions, embed_views
from finegrain.models.heads import CosineClassifier, ProjectionHead
from finegrain.registry import SUPCON_LOSSES


class SupervisedMethod(BackboneMethod):
    """Backbone + objective head, trained by `finegrain.engine.loop.fit`.

    forward(views, labels): views is a list of V tensors (B, 3, S, S); all V*B views are embedded
    (one backbone pass per view) and `loss(head_out, labels)` sees (V*B, ...) outputs with labels
    repeated V times. An objective's own options (temperature, margin, ...) are its `Options`, kept as
    `self.options`.

    Unlabelled photos (label -1) in the batch need a teacher (`use_teacher`, objectives with a
    classifier only): an `EmaTeacher` names the confident ones (pseudo-labels: in the metric term,
    and in the cross-entropy term with pseudo_ce or when that is the only term), an
    `ArtifactTeacher` gives soft labels for every view, and the classifier's loss becomes
    distill_weight x KL(teacher, model) + (1 - distill_weight) x cross-entropy on the labels.

    Args:
        backbone: timm model giving pooled features (B, D).
        head: the objective's head on (B, D) features.
        options: the objective's `Options` (default: all at their defaults).
        num_classes: classes in the labelled train split.
        freeze_bn: keep every backbone BatchNorm in eval mode with frozen affine parameters.
        head_warmup_steps: optimizer steps during which only the head trains (backbone run under
            no_grad, so its parameters get no gradient and no weight decay).
    """

    base_lr = 0.2  # SGD, per 256 images, for the head; the backbone gets backbone_lr_scale x this
    find_unused_parameters = True  # the backbone is outside the graph during head warm-up (DDP)
    has_classifier = False  # objectives with a classifier head (`classifier`) can learn from a teacher
    distill_weight, distill_temperature, pseudo_ce = 0.7, 1.0, False

    def __init__(self, backbone: nn.Module, head: nn.Module, options: MethodOptions | None = None, *, num_classes: int,
                 freeze_bn: bool = True, head_warmup_steps: int = 0):
        super().__init__(backbone, options, freeze_bn=freeze_bn)
        self.head = head
        self.num_classes = num_classes
        self.accuracy_chance = 1.0 / num_classes
        self.head_warmup_steps = head_warmup_steps
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # saved in checkpoints
        self.teacher: nn.Module | None = None

    def loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        """The objective on the head's output for (V*B,) labels -> scalar."""
        raise NotImplementedError

    def loss_terms(self, out, labels: torch.Tensor, soft: torch.Tensor | None = None,
                   ce_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{"loss": the objective, and for a sum of terms each term by name (logged beside it)}.

        For objectives with a classifier: soft (V*B, C) a teacher's class scores for every view;
        ce_labels (V*B,) the labels of a cross-entropy term beside a metric term, when they differ
        from `labels` (pseudo-labels join the metric term only).
        """
        return {"loss": self.loss(out, labels)}

    def use_teacher(self, teacher: nn.Module, *, distill_weight: float = 0.7, distill_temperature: float = 1.0,
                    pseudo_ce: bool = False) -> None:
        """Learn from `teacher` (finegrain.methods.teachers) on labelled and unlabelled photos.

        pseudo_ce: pseudo-labels join the cross-entropy term too, not only the metric term.
        """
        if not self.has_classifier:
            raise ValueError(f"{type(self).__name__} has no classifier to learn from a teacher")
        self.teacher = teacher
        self.distill_weight, self.distill_temperature, self.pseudo_ce = distill_weight, distill_temperature, pseudo_ce

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor | None = None):
        """Cross-entropy on the labelled rows of (N, C) logits; with a teacher's soft (N, C) scores, mixed with KL."""
        ce = labelled_cross_entropy(logits, labels, self.options.label_smoothing)
        if soft is None:
            return ce
        kl = soft_target_kl(logits, soft, self.distill_temperature)
        return (1 - self.distill_weight) * ce + self.distill_weight * kl

    def logits(self, out) -> torch.Tensor | None:
        """(V*B, classes) class scores in the head's output, when the objective has a classifier."""
        return None

    def forward(self, views, labels):
        y = labels.repeat(len(views))
        if self.training and int(self.steps_done) < self.head_warmup_steps:
            with torch.no_grad():
                features = embed_views(self.backbone, views)
        else:
            features = embed_views(self.backbone, views)
        targets, extra = {}, {}
        if self.teacher is not None:
            named, soft, extra = self.teacher.targets(views, labels)
            targets = {"soft": soft, "ce_labels": None if self.pseudo_ce else y}
            targets = {k: v for k, v in targets.items() if v is not None}
            y = named
            if soft is None:  # photos left unnamed send no gradient (the head's BatchNorm would route some)
                features = torch.where((y >= 0)[:, None], features, features.detach())
        out = self.head(features)
        terms = self.loss_terms(out, y, **targets)
        loss = terms.pop("loss")
        with torch.no_grad():
            named = y >= 0
            same = (y[:, None] == y[None, :]) & named[:, None]
            metrics = {"positives_per_anchor": (same.sum(1) - 1).float()[named].mean(), **extra,
                       **{k: v.detach() for k, v in terms.items()}}
            logits = self.logits(out)
            if logits is not None:  # a classifier: report its train accuracy (on named views)
                metrics["accuracy"] = (logits.argmax(1) == y).float()[named].mean()
        return loss, metrics

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Count optimizer steps (ends the head-only warm-up); move an EMA teacher."""
        self.steps_done.fill_(step)
        if hasattr(self.teacher, "update"):
            self.teacher.update(self.backbone, self.classifier, step)


@dataclass
class SupConOptions(ProjectionOptions):
    """SupCon on a projection head."""

    temperature: float = option(0.1, "SupCon temperature.", check=POSITIVE)


@dataclass
class ClassifierOptions(MethodOptions):
    """Cross-entropy on a cosine classifier."""

    label_smoothing: float = option(0.1, "Cross-entropy label smoothing.", check=FRACTION_BELOW_1)
    ce_temperature: float = option(0.05, "The classifier's logits are cosine similarities divided by this "
                                         "(NormSoftmax): stable at any feature scale.", check=POSITIVE)


def projection(backbone: nn.Module, options: ProjectionOptions) -> ProjectionHead:
    """(B, D) -> (B, proj_dim) projection MLP sized from the backbone."""
    dim = backbone.num_features
    return ProjectionHead(dim, options.proj_hidden or dim, options.proj_dim)


class ProjectionObjective(SupervisedMethod):
    """An objective on a projection head: (B, D) -> (B, proj_dim)."""

    Options = ProjectionOptions

    def __init__(self, backbone, options: ProjectionOptions | None = None, **context):
        options = self.Options() if options is None else options
        super().__init__(backbone, projection(backbone, options), options, **context)


@SUPCON_LOSSES.register("supcon")
class SupCon(ProjectionObjective):
    """SupCon (Khosla et al. 2020): all same-class views in the batch are positives"""

    Options = SupConOptions

    def loss(self, z, labels):
        return supcon(z, labels, temperature=self.options.temperature)


@SUPCON_LOSSES.register("triplet")
class Triplet(ProjectionObjective):
    """batch-hard triplet (Hermans et al. 2017)"""

    @dataclass
    class Options(ProjectionOptions):
        margin: float = option(0.2, "Triplet margin (on L2-normalised embeddings).", check=at_least(0))

    def loss(self, z, labels):
        return batch_hard_triplet(z, labels, margin=self.options.margin)


@SUPCON_LOSSES.register("contrastive")
class Contrastive(ProjectionObjective):
    """pairwise margin loss (Hadsell et al. 2006): same class pulled together, others pushed past --neg-margin"""

    @dataclass
    class Options(ProjectionOptions):
        neg_margin: float = option(0.5, "Distance (L2 on the unit sphere, 0-2) beyond which different-class pairs "
                                        "cost nothing.", check=Check(lambda v: 0 < v <= 2, "above 0 and at most 2"))

    def loss(self, z, labels):
        return contrastive(z, labels, pos_margin=0.0, neg_margin=self.options.neg_margin)


@SUPCON_LOSSES.register("ce")
class CrossEntropy(SupervisedMethod):
    """cross-entropy with label smoothing on a cosine classifier (baseline)"""

    Options = ClassifierOptions
    has_classifier = True

    def __init__(self, backbone, options: ClassifierOptions | None = None, *, num_classes: int, **context):
        options = self.Options() if options is None else options
        head = CosineClassifier(backbone.num_features, num_classes, options.ce_temperature)
        super().__init__(backbone, head, options, num_classes=num_classes, **context)

    @property
    def classifier(self) -> nn.Module:
        return self.head

    def loss(self, logits, labels):
        return self.classification_loss(logits, labels)

    def loss_terms(self, logits, labels, soft=None, ce_labels=None):
        # cross-entropy is this objective's only term: pseudo-labels (in `labels`) always join it
        return {"loss": self.classification_loss(logits, labels, soft)}

    def logits(self, out):
        return out


class ProjectionAndClassifier(nn.Module):
    """Two heads on the same pooled features: (B, D) -> ((B, proj_dim) projection, (B, classes) logits)."""

    def __init__(self, projection: nn.Module, classifier: nn.Module):
        super().__init__()
        self.projection = projection
        self.classifier = classifier

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.projection(features), self.classifier(features)


@SUPCON_LOSSES.register("supcon_ce")
class SupConCE(SupervisedMethod):
    """SupCon on a projection head + --ce-weight x cross-entropy on a cosine classifier, both on the backbone features"""

    @dataclass
    class Options(SupConOptions, ClassifierOptions):
        ce_weight: float = option(1.0, "Weight of the cross-entropy term beside SupCon.", check=at_least(0))

    has_classifier = True

    def __init__(self, backbone, options: Options | None = None, *, num_classes: int, **context):
        options = self.Options() if options is None else options
        head = ProjectionAndClassifier(projection(backbone, options),
                                       CosineClassifier(backbone.num_features, num_classes, options.ce_temperature))
        super().__init__(backbone, head, options, num_classes=num_classes, **context)

    @property
    def classifier(self) -> nn.Module:
        return self.head.classifier

    def loss(self, out, labels):
        return self.loss_terms(out, labels)["loss"]

    def loss_terms(self, out, labels, soft=None, ce_labels=None):
        z, logits = out
        ce = self.classification_loss(logits, labels if ce_labels is None else ce_labels, soft)
        con = supcon(z, labels, temperature=self.options.temperature)
        return {"loss": con + self.options.ce_weight * ce, "loss_supcon": con, "loss_ce": ce}

    def logits(self, out):
        return out[1]
