"""`finegrain evaluate`: kNN, linear probe and retrieval metrics, per-class results, plots and a report.

Evaluates an artifact (its normalisation from artifact.json; by default at 1.125 x its training size,
features averaged with the mirror image's) or a bare backbone on a manifest. Protocol:
- kNN and linear probe: references are the labelled train images, queries the test split (val
  when there is no test); test images of classes never seen in training are left out of both (and
  counted). Nothing is tuned on the queries: k and T are fixed (20, 0.07 by default) and the
  probe's regularisation is chosen on val (or a hold-out of train).
- The artifact's own classifier (classifier_top1/5): the class `predict` names for each query (open
  set off), read as predict reads photos. With pseudo-labelled photos in the artifact (`pseudo-label`),
  knn_pseudo_top1/5: kNN whose gallery is the labelled train photos plus those photos with their
  pseudo-labels (knn_top1 keeps the labelled gallery only).
- Retrieval (Recall@K, MAP@R): leave-one-out within `retrieval_split`, any classes, as in the
  zero-shot CUB protocol.
- Open set, when the queries hold classes never seen in training: how well a score tells those
  photos from the queries of trained classes (eval/open_set.py): AUROC and FPR at 95% TPR of the
  relative Mahalanobis distance, of the distance to the k-th nearest train photo (k as the artifact
  stores it, else choose_k(DEFAULT_K)), and of the linear probe's max-softmax and max-logit
  baselines; the headline is the score the artifact's predict uses.
Features come from the shared features cache (features/cache.py; --features-dir to choose it), keyed
by the model's weights, preprocessing and photos, so re-running (other k, other probe) or auditing the
same artifact does not extract again. Writes OUT/report/ (report/evaluation.py: metrics.json,
per_class.csv, confused_pairs.csv, open_set.csv when there are unseen classes, PNG plots, index.html)
and an artifact whose weights are the linear probe.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import pandas as pd
import torch

from finegrain.artifacts import Artifact
from finegrain.config import EvaluateConfig
from finegrain.data.manifest import Manifest
from finegrain.curation.audit import SUMMARY_FILE as AUDIT_SUMMARY_FILE
from finegrain.errors import FinegrainError
from finegrain.eval.classifier import classifier_logits, named_topk_accuracy
from finegrain.eval.index import resolve_kind
from finegrain.eval.knn import knn_scores, topk_accuracy
from finegrain.eval.open_set import (DEFAULT_K, RelativeMahalanobis, choose_k, knn_distance_scores, max_logit_scores,
                                     max_softmax_scores, open_set_metrics)
from finegrain.eval.retrieval import retrieval_metrics
from finegrain.features.store import FeatureStore
from finegrain.features.subject import Subject
from finegrain.lineage import ancestors, starting_weights
from finegrain.report.evaluation import COMPARED, ReportOptions, write_evaluation_report
from finegrain.report.photo_sections import Photos
from finegrain.stages.skeleton import stage_run

log = logging.getLogger("finegrain")

METRIC_KEYS = ("knn_top1", "knn_top5", "linear_top1", "linear_top5", "recall_at_1", "recall_at_2", "recall_at_4",
               "recall_at_8", "map_at_r")
# The artifact's own classifier on the queries (what `predict` names, open set off), and kNN whose gallery adds the
# artifact's pseudo-labelled photos to the labelled ones; None for a bare backbone or an artifact without them.
ARTIFACT_KEYS = ("classifier_top1", "classifier_top5", "knn_pseudo_top1", "knn_pseudo_top5")
STAND_INS = {"classifier_top1": "linear_top1", "knn_pseudo_top1": "knn_top1"}  # in the comparison, for a baseline
OPEN_SET_KEYS = ("open_set_auroc", "open_set_fpr95")  # of the artifact's open-set score; None without unseen classes


def run_evaluate(cfg: EvaluateConfig) -> Artifact:
    """Evaluate as `cfg` says; write OUT/report/ and the evaluation artifact; return it."""
    with stage_run("evaluate", cfg) as run:
        subject = Subject(cfg)
        audit = _audit_summary(cfg.audit) if cfg.audit else None  # read before any photo is
        store = FeatureStore(cfg, subject, run.device, amp_dtype=run.amp_dtype)
        metrics, context, probe, report_data, timings = _measure(cfg, run.manifest, store)
        context["manifest_hash"] = run.manifest.content_hash
        report_data["audit"] = audit
        report_data["baselines"] = _baselines(cfg, run, subject)
        context.update({f"time_{k}": round(v, 2) for k, v in timings.items()})

        if subject.artifact is not None:
            run.parent = subject.artifact.lineage()
        run.track()
        options = ReportOptions(embedding_map=cfg.embedding_map, seed=cfg.seed, examples_per_class=cfg.report_examples)
        tables, images = write_evaluation_report(run.out / "report", metrics, context, report_data, options)
        if run.tracker is not None:
            run.tracker.log_report(tables, {name: run.out / "report" / file for name, file in images.items()})
        state = {}
        if probe is not None:
            state = {"classifier.weight": torch.from_numpy(probe.weight), "classifier.bias": torch.from_numpy(probe.bias)}
        info = {"backbone": subject.name, "embedding_dim": int(subject.model.num_features),
                "image_size": subject.image_size, "mean": list(subject.mean), "std": list(subject.std),
                "bbox_crop": cfg.bbox_crop, "class_names": report_data.get("classes") or None, "timings": timings,
                "report": "report/index.html", "wandb_artifact": "evaluation"}
        return run.write(state, info, metrics, wandb_type="evaluation", wandb_folder=run.out / "report")


def _measure(cfg: EvaluateConfig, manifest: Manifest, store: FeatureStore, *, open_set: bool = True):
    """Every metric of `store`'s subject on `manifest`: (metrics, context, probe or None, report data, timings).

    open_set: False skips the unknown-species scores (a baseline of the comparison shows none)."""
    subject = store.subject
    metrics: dict = {k: None for k in METRIC_KEYS + ARTIFACT_KEYS + OPEN_SET_KEYS}
    context = {"evaluated": subject.source, "backbone": subject.name, "manifest": str(cfg.manifest),
               "image_size": subject.image_size, "bbox_crop": cfg.bbox_crop, "flip_tta": cfg.flip_tta,
               "retrieval_split": cfg.retrieval_split}
    timings: dict = {}
    probe, report_data = _classify(cfg, manifest, store, metrics, context, timings, open_set=open_set)
    retrieval_rows = manifest.rows(cfg.retrieval_split)
    if len(retrieval_rows) >= 2:
        fr = store.features(retrieval_rows, cfg.retrieval_split)
        start = time.perf_counter()
        found = retrieval_metrics(fr, retrieval_rows.class_codes(retrieval_rows.class_names), index=cfg.index)
        context["retrieval_queries"] = int(found.pop("retrieval_queries"))  # a count, not a metric
        metrics.update(found)
        timings["retrieval_s"] = time.perf_counter() - start
    else:
        log.warning("fewer than 2 labelled %s images: retrieval metrics skipped", cfg.retrieval_split)
    timings["extraction_s"] = store.seconds
    return metrics, context, probe, report_data, timings


def _photo_refs(rows: Manifest) -> list[str]:
    """Each row's photo as text for the report: its absolute path, or for shards a ShardPhoto that reads its record."""
    return [rows.abspath(p) if rows.shards is not None else str(rows.abspath(p)) for p in rows.table["path"]]


def _baselines(cfg: EvaluateConfig, run, subject: Subject) -> dict[str, dict]:
    """Name -> (label, headline metrics) of what the artifact is compared with, on the same photos and features
    settings: the frozen starting backbone ("frozen") and, with --compare lineage, each earlier artifact."""
    if cfg.compare == "none" or subject.artifact is None:
        return {}
    found: dict[str, dict] = {}
    start = starting_weights(subject.artifact)
    same = dict(image_size=subject.image_size, embedding_map=False, audit=None, compare="none")
    if start is not None:
        frozen = dataclasses.replace(cfg, from_artifact=None, backbone=start.backbone, weights=start.weights,
                                     pretrained=start.pretrained, **same)
        found["frozen"] = _headline_of(frozen, run, start.label)
    for earlier in ancestors(subject.artifact) if cfg.compare == "lineage" else []:
        name = earlier.info["stage"] if earlier.info["stage"] not in found else f"{earlier.info['stage']}_{len(found)}"
        found[name] = _headline_of(dataclasses.replace(cfg, from_artifact=str(earlier.path), **same), run,
                                   f"{earlier.info['stage']} artifact {earlier.path}")
    return {name: value for name, value in found.items() if value is not None}


def _headline_of(cfg: EvaluateConfig, run, label: str) -> dict | None:
    """{"label", COMPARED metrics} of the subject `cfg` names; None (with a warning) when it cannot be built."""
    torch.manual_seed(cfg.seed)  # random starting weights ("none") come out as the training stage drew them
    try:
        subject = Subject(cfg)
    except Exception as e:  # noqa: BLE001 - a baseline that cannot be built (weights gone, no network) is skipped
        log.warning("compare: cannot build %s (%s); left out of the comparison", label, e)
        return None
    log.info("compare: %s", label)
    store = FeatureStore(cfg, subject, run.device, amp_dtype=run.amp_dtype)
    metrics = _measure(cfg, run.manifest, store, open_set=False)[0]
    # a subject without its own classifier or pseudo-labels answers with its linear probe and labelled-gallery kNN
    filled = {k: metrics.get(k) if metrics.get(k) is not None else metrics.get(instead) for k, instead in STAND_INS.items()}
    return {"label": label, **{k: metrics.get(k) for k in COMPARED}, **filled}


def _classify(cfg: EvaluateConfig, manifest: Manifest, store: FeatureStore, metrics: dict, context: dict,
              timings: dict, open_set: bool = True):
    """kNN (and the linear probe) of the query split against train, into `metrics`; (probe or None, report data)."""
    train = manifest.rows("train")
    classes = sorted(set(train.table["label"].astype(str)))
    query_split = "test" if (manifest.table["split"] == "test").any() else "val"
    context["query_split"] = query_split
    all_queries = manifest.rows(query_split)
    if len(classes) < 2 or not len(all_queries):
        log.warning("no labelled train images of 2+ classes, or no labelled %s images: kNN and linear probe skipped",
                    query_split)
        return None, {}
    queries = manifest.rows(query_split, classes)
    if len(queries) < len(all_queries):
        log.warning("%d %s images of classes without train images are left out of kNN and the linear probe",
                    len(all_queries) - len(queries), query_split)
    ftr, ytr = store.features(train, "train"), train.class_codes(classes)
    fq, yq = store.features(queries, query_split), queries.class_codes(classes)
    start = time.perf_counter()
    knn = knn_scores(ftr, ytr, fq, num_classes=len(classes), k=cfg.knn_k, temperature=cfg.knn_t, index=cfg.index)
    acc = topk_accuracy(knn, yq)
    timings["knn_s"] = time.perf_counter() - start
    metrics.update(knn_top1=acc[1], knn_top5=acc[5])
    probs, probe = knn / knn.sum(1, keepdim=True).clamp_min(1e-12), None
    context.update(knn_k=cfg.knn_k, knn_t=cfg.knn_t, index=resolve_kind(cfg.index, len(train)), train_images=len(train), query_images=len(queries),
                   classes=len(classes))
    if cfg.linear:
        probe, selected_on, logits, lin_acc, seconds = _linear_probe(store, manifest, classes, ftr, ytr, fq, yq,
                                                                     query_split, cfg)
        probs = logits.softmax(1)
        timings["linear_s"] = seconds
        metrics.update(linear_top1=lin_acc[1], linear_top5=lin_acc[5])
        context.update(linear_C=probe.C_reg, linear_C_chosen_on=selected_on)
    if store.subject.artifact is not None:
        _artifact_classifier(cfg, store, queries, query_split, metrics, context)
        _pseudo_gallery_knn(cfg, manifest, store, (ftr, ytr), (fq, yq), classes, metrics, context)
    unseen = all_queries.rows(query_split, sorted(set(all_queries.table["label"]) - set(classes)))
    open_set = _open_set(store, unseen, ftr, ytr, fq, probe, metrics, context) if open_set else None
    confidence, predictions = probs.max(1)
    photos = Photos(classes, _photo_refs(queries), yq.numpy(), predictions.numpy(), confidence.numpy(),
                    _photo_refs(train), ytr.numpy())
    return probe, dict(y_true=yq.numpy(), y_pred=predictions.numpy(), classes=classes, photos=photos,
                       predicted_by="linear probe" if cfg.linear else "kNN", features=fq.numpy(), open_set=open_set)


def _artifact_classifier(cfg: EvaluateConfig, store: FeatureStore, queries: Manifest, query_split: str, metrics: dict,
                         context: dict) -> None:
    """classifier_top1/5: the artifact's own classifier on the queries, read as `predict` reads photos (the
    classifier's image size and flip averaging, open set off); nothing when the artifact has no classifier."""
    artifact = store.subject.artifact
    head, names = artifact.state_dict("classifier."), artifact.info.get("class_names") or []
    if not head or not names:
        return
    fitted = artifact.info.get("classifier") or {}
    size, flip = fitted.get("image_size", artifact.info["image_size"]), fitted.get("flip_tta", False)
    read = store
    if (size, flip) != (store.subject.image_size, cfg.flip_tta):
        as_predict = dataclasses.replace(cfg, image_size=size, flip_tta=flip)
        read = FeatureStore(as_predict, Subject(as_predict), store.device, amp_dtype=store.amp_dtype)
    logits = classifier_logits(read.features(queries, query_split), head["weight"], head["bias"])
    acc = named_topk_accuracy(logits, names, queries.table["label"].astype(str).to_numpy())
    metrics.update(classifier_top1=acc[1], classifier_top5=acc[5])
    context.update(classifier_image_size=size, classifier_flip_tta=flip)


def _pseudo_gallery_knn(cfg: EvaluateConfig, manifest: Manifest, store: FeatureStore, train: tuple, queries: tuple,
                        classes: list[str], metrics: dict, context: dict) -> None:
    """knn_pseudo_top1/5: kNN of the queries against the labelled train photos plus the artifact's pseudo-labelled
    photos (its PSEUDO_LABELS_FILE, rows of this manifest outside the query split, with their pseudo-labels)."""
    from finegrain.stages.pseudo_label import read_pseudo_labels

    table = read_pseudo_labels(store.subject.artifact)
    if table is None:
        return
    named = dict(zip(table["path"], table["label"].astype(str)))
    pool = manifest.table[manifest.table["path"].isin(named) & ~manifest.table["split"].isin([context["query_split"]])]
    pool = pool[pool["path"].map(named).isin(classes)].assign(label=lambda t: t["path"].map(named))
    context["pseudo_gallery_images"] = len(pool)
    if not len(pool):
        log.warning("the artifact's pseudo-labelled photos are not in %s: knn_pseudo left out", cfg.manifest)
        return
    rows = dataclasses.replace(manifest, table=pool.reset_index(drop=True))
    fg = torch.cat([train[0], store.features(rows, "pseudo_gallery")])
    yg = torch.cat([train[1], rows.class_codes(classes)])
    acc = topk_accuracy(knn_scores(fg, yg, queries[0], num_classes=len(classes), k=cfg.knn_k, temperature=cfg.knn_t,
                                   index=cfg.index), queries[1])
    metrics.update(knn_pseudo_top1=acc[1], knn_pseudo_top5=acc[5])


def _open_set(store: FeatureStore, unseen: Manifest, ftr, ytr, fq, probe, metrics: dict,
              context: dict) -> tuple[pd.DataFrame, dict] | None:
    """Open-set scores of the queries of trained classes (fq, known) and of `unseen` rows (unknown).

    Puts the AUROC and FPR95 of the artifact's score (relative Mahalanobis for a bare backbone) into
    `metrics`, every score's into `context`; returns them as a table (score, auroc, fpr95) and the
    scores (name -> (known, unknown)), or None when there are no unseen or no known queries.
    """
    if not len(unseen) or not len(fq):
        return None
    fu = store.features(unseen, f"{context['query_split']}_unseen")
    stored = (store.subject.artifact.info.get("open_set") or {}) if store.subject.artifact is not None else {}
    k = int(stored["k"]) if stored else choose_k(DEFAULT_K, ytr)
    mahalanobis = RelativeMahalanobis.fit(ftr, ytr)
    scores = {"relative_mahalanobis": (mahalanobis.scores(fq), mahalanobis.scores(fu)),
              "knn_distance": (knn_distance_scores(ftr, fq, k), knn_distance_scores(ftr, fu, k))}
    if probe is not None:
        known, unknown = (torch.from_numpy(probe.scores(f)) for f in (fq, fu))
        scores["max_softmax"] = (max_softmax_scores(known), max_softmax_scores(unknown))
        scores["max_logit"] = (max_logit_scores(known), max_logit_scores(unknown))
    found = {name: open_set_metrics(*pair) for name, pair in scores.items()}
    headline = stored.get("score", "relative_mahalanobis")
    metrics.update(open_set_auroc=found[headline]["auroc"], open_set_fpr95=found[headline]["fpr95"])
    context.update(unseen_images=len(unseen), unseen_classes=unseen.table["label"].nunique(), open_set_score=headline,
                   open_set_k=k, open_set_from="artifact" if stored else "default")
    for name, m in found.items():
        context.update({f"open_set_auroc_{name}": round(m["auroc"], 4), f"open_set_fpr95_{name}": round(m["fpr95"], 4)})
    return pd.DataFrame([{"score": name, **m} for name, m in found.items()]), scores


def _linear_probe(store, manifest, classes, ftr, ytr, fq, yq, query_split, cfg):
    """Fit the probe (C chosen on val when the queries are test and val exists); (probe, where C was chosen,
    (Q, C) logits of the queries, top-k accuracy, seconds)."""
    from finegrain.eval.knn import topk_accuracy
    from finegrain.eval.linear import fit_linear_probe

    val_x = val_y = None
    if query_split == "test":
        val = manifest.rows("val", classes)
        if len(val):
            val_x, val_y = store.features(val, "val"), val.class_codes(classes)
    start = time.perf_counter()
    probe = fit_linear_probe(ftr, ytr, num_classes=len(classes), val_x=val_x, val_y=val_y, seed=cfg.seed)
    selected_on = "val" if val_x is not None else ("train hold-out" if probe.val_top1 is not None else "default C")
    scores = torch.from_numpy(probe.scores(fq.numpy()))
    seconds = time.perf_counter() - start
    return probe, selected_on, scores, topk_accuracy(scores, yq), seconds


def _audit_summary(audit_dir: str) -> tuple[pd.DataFrame, Path]:
    """The flagged counts of a `finegrain audit` folder (issue, photos) and the absolute path of its page."""
    summary_file = Path(audit_dir) / AUDIT_SUMMARY_FILE
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError) as e:
        raise FinegrainError(f"--audit: cannot read {summary_file} ({getattr(e, 'strerror', None) or e}); "
                             "pass the folder `finegrain audit` wrote") from None
    counts = pd.DataFrame([{"issue": issue, "photos": int(n)} for issue, n in summary.get("flagged", {}).items()])
    return counts, (Path(audit_dir) / "audit.html").resolve()
