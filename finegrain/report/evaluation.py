"""Everything `finegrain evaluate` writes into OUT/report/: metrics.json, tables (CSV), plots (PNG), index.html.

The stage measures; this module presents: one call, `write_evaluation_report`, per report.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from finegrain.fsutil import atomic_write_text
from finegrain.report.embedding_map import embedding_map, plot_embedding_map
from finegrain.report.evaluation_page import write_html_report
from finegrain.report.photo_sections import confident_mistakes, sections_html
from finegrain.report.plots import plot_confusion_matrix, plot_open_set_roc, plot_per_class_accuracy
from finegrain.report.tables import confused_pairs, per_class_accuracy

# the metrics the comparison shows; a baseline without its own classifier or pseudo-labels shows its linear probe
# and its kNN there
COMPARED = ("classifier_top1", "knn_top1", "knn_pseudo_top1", "linear_top1", "recall_at_1", "map_at_r")
TABLE_TITLES = {  # table name -> its section title on the page, in page order
    "audit": "Audit (finegrain audit): photos flagged for a second look, listed in the audit page",
    "confused_pairs": "Most confused species", "per_class": "Per-class accuracy",
    "open_set": "Unknown species (query classes not in train): AUROC and FPR at 95% TPR of each score"}


@dataclass
class ReportOptions:
    """What the report draws: the t-SNE map (seeded), and correct photos shown per species (0: none)."""

    embedding_map: bool = True
    seed: int = 0
    examples_per_class: int = 0


def write_evaluation_report(folder: Path, metrics: dict, context: dict, data: dict,
                            options: ReportOptions) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Write the report folder; return its tables (name -> DataFrame) and images (name -> file in `folder`).

    Args:
        metrics: metric key -> fraction in [0, 1] or None (not measured).
        context: setting -> value of the run (evaluated, query_split, classes, ...); the report adds
            per_class_predicted_by and audit to it.
        data: what the measurement found, each key optional: y_true, y_pred ((Q,) class ids of the
            queries), classes (C names), features ((Q, D) query features), photos (photo_sections.Photos),
            predicted_by, open_set ((table, score name -> (known, unknown) tensors)), audit ((table,
            absolute path of audit.html)), baselines (name -> {"label", COMPARED metrics}).
    """
    folder.mkdir(parents=True, exist_ok=True)
    tables, images, photos, links = {}, {}, {}, {}
    chance = 1.0 / len(data["classes"]) if data.get("classes") else None
    comparison = _comparison(metrics, data.get("baselines") or {}, chance, context)
    if data.get("y_true") is not None:
        photos = _classification(folder, data, context, options, tables, images)
    if data.get("open_set") is not None:
        _open_set(folder, *data["open_set"], tables, images)
    if data.get("audit") is not None:
        tables["audit"], page = data["audit"]
        context["audit"] = Path(os.path.relpath(page, folder.resolve())).as_posix()
        links["Audit: the flagged photos beside typical photos of their species"] = context["audit"]
    _write_metrics_json(folder / "metrics.json", metrics, chance, data.get("baselines") or {}, context)
    write_html_report(folder, title=f"finegrain evaluation: {context['evaluated']}",
                      metrics={k: v for k, v in metrics.items() if v is not None}, context=context,
                      tables={title: tables[name] for name, title in TABLE_TITLES.items() if name in tables},
                      images=images, links=links, comparison=comparison, notes=_notes(chance, context), photos=photos)
    if data.get("photos") is not None:
        tables["confident_mistakes"] = confident_mistakes(data["photos"])  # W&B shows its photo column as images
    if comparison is not None:
        tables["compared_with"] = comparison
    return tables, images


def _classification(folder: Path, data: dict, context: dict, options: ReportOptions, tables: dict,
                    images: dict) -> dict:
    """Per-class and confused-pair tables (CSV), their plots and the t-SNE map (PNG); returns the photo sections."""
    y, p, classes = data["y_true"], data["y_pred"], data["classes"]
    per_class = per_class_accuracy(y, p, classes)
    pairs = confused_pairs(y, p, classes)
    for name, df in (("per_class", per_class), ("confused_pairs", pairs)):
        atomic_write_text(folder / f"{name}.csv", df.to_csv(index=False))
        tables[name] = df
    plot_confusion_matrix(y, p, classes, folder / "confusion_matrix.png")
    plot_per_class_accuracy(per_class, folder / "per_class_accuracy.png")
    images["confusion_matrix"] = "confusion_matrix.png"
    images["per_class_accuracy"] = "per_class_accuracy.png"
    if options.embedding_map and len(y) >= 5:
        xy, idx = embedding_map(data["features"], seed=options.seed)
        plot_embedding_map(xy, y[idx], classes, folder / "embedding_map.png",
                           title=f"t-SNE of {context['query_split']} embeddings")
        images["embedding_map"] = "embedding_map.png"
    context["per_class_predicted_by"] = data["predicted_by"]
    return sections_html(data["photos"], pairs, options.examples_per_class)


def _open_set(folder: Path, table: pd.DataFrame, scores: dict, tables: dict, images: dict) -> None:
    """open_set.csv (score, auroc, fpr95) and the ROC curves of the scores (name -> (known, unknown) tensors)."""
    atomic_write_text(folder / "open_set.csv", table.to_csv(index=False))
    tables["open_set"] = table
    plot_open_set_roc({k: (a.numpy(), b.numpy()) for k, (a, b) in scores.items()}, folder / "open_set_roc.png")
    images["open_set_roc"] = "open_set_roc.png"


def _write_metrics_json(path: Path, metrics: dict, chance: float | None, baselines: dict, context: dict) -> None:
    """metrics.json: the metrics, chance, each baseline's COMPARED metrics and the context, for scripts."""
    found = {**metrics, "chance": chance, "baselines": {k: {m: v[m] for m in COMPARED} for k, v in baselines.items()}}
    atomic_write_text(path, json.dumps({**found, "context": context}, indent=2, default=str) + "\n")


def _notes(chance: float | None, context: dict) -> dict[str, str]:
    """Metric key -> chance level and photo counts, shown beside the headline accuracies."""
    if chance is None:
        return {}
    photos = f"{context.get('query_images')} {context.get('query_split')} photos of {context.get('classes')} species"
    out = {f"{kind}_top{k}": f"chance {min(1.0, k * chance):.1%}; {photos}"
           for kind in ("knn", "linear", "classifier", "knn_pseudo") for k in (1, 5)}
    if context.get("retrieval_queries"):
        out.update({f"recall_at_{k}": f"{context['retrieval_queries']} {context['retrieval_split']} photos as queries"
                    for k in (1, 2, 4, 8)})
    return out


def _comparison(metrics: dict, baselines: dict, chance: float | None, context: dict) -> pd.DataFrame | None:
    """The "Compared with" table: chance, each baseline, then this subject (rows), COMPARED metrics (columns)."""
    if chance is None:
        return None
    rows = [{"compared with": f"chance (1 of {context.get('classes')} species)",
             **{k: chance for k in ("classifier_top1", "knn_top1", "knn_pseudo_top1", "linear_top1")}}]
    rows += [{"compared with": b["label"], **{k: b.get(k) for k in COMPARED}} for b in baselines.values()]
    rows.append({"compared with": f"this: {context['evaluated']}", **{k: metrics.get(k) for k in COMPARED}})
    return pd.DataFrame(rows, columns=["compared with", *COMPARED])
